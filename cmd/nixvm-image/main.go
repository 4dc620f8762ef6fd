// Command nixvm-image builds deterministic NixOS disk images from Nix
// closures, pushes them to libvirt/KVM hosts sending only the blocks a host
// lacks, and provisions guest disks from them.
//
// main only parses and exits; each subcommand lives in its own file as an
// options struct with AddFlags and a run function (see build.go).
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func main() {
	// NIXVM_IMAGE_CPUPROFILE=FILE writes a CPU profile, for benchmarks.
	stopProfile := startProfile(os.Getenv("NIXVM_IMAGE_CPUPROFILE"))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := Context{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Args: os.Args[1:]}.Execute(ctx)
	stop()
	stopProfile()
	os.Exit(code)
}

// startProfile starts a CPU profile into the file name ("" is none) and
// returns what stops it. A profile that cannot be written is reported, not
// fatal: it is a benchmark aid.
func startProfile(name string) func() {
	if name == "" {
		return func() {}
	}
	f, err := os.Create(name)
	if err == nil {
		if err = pprof.StartCPUProfile(f); err != nil {
			f.Close()
		}
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nixvm-image: NIXVM_IMAGE_CPUPROFILE: %v\n", err)
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "nixvm-image: NIXVM_IMAGE_CPUPROFILE: %v\n", err)
		}
	}
}
