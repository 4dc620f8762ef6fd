// Command nixvm-image builds deterministic NixOS disk images from Nix
// closures, pushes them to libvirt/KVM hosts sending only the blocks a host
// lacks, and provisions guest disks from them.
//
// main only parses and exits; each subcommand lives in its own file as an
// options struct with AddFlags and a run function (see build.go).
package main

import (
	"context"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func main() {
	// NIXVM_IMAGE_CPUPROFILE=FILE writes a CPU profile, for benchmarks.
	if p := os.Getenv("NIXVM_IMAGE_CPUPROFILE"); p != "" {
		if f, err := os.Create(p); err == nil {
			pprof.StartCPUProfile(f)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := Context{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Args: os.Args[1:]}.Execute(ctx)
	stop()
	pprof.StopCPUProfile() // a no-op without NIXVM_IMAGE_CPUPROFILE
	os.Exit(code)
}
