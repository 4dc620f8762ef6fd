// Package version is the version both binaries print with --version.
//
// Version is set at link time by the Nix package and release builds:
//
//	go build -ldflags "-X github.com/nixvm-image/nixvm-image/internal/version.Version=0.1.0" ./cmd/...
//
// Without it, String falls back to what the Go toolchain recorded: the
// module version when built with `go install module@version`, else the VCS
// revision of a checkout ("devel+abc123def456", "+dirty" when modified).
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is the release version, without a leading "v"; set with -ldflags -X.
var Version = ""

// String is the one line that `PROGRAM --version` prints:
// "nixvm-image 0.1.0 (go1.26.8 linux/amd64)".
func String(program string) string {
	return fmt.Sprintf("%s %s (%s %s/%s)", program, resolve(Version, readBuildInfo()), runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// buildInfo is what resolve needs of debug.BuildInfo.
type buildInfo struct {
	module   string // Main.Version: "v0.1.0" or "(devel)"
	revision string // vcs.revision
	modified bool   // vcs.modified
}

func readBuildInfo() buildInfo {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return buildInfo{}
	}
	b := buildInfo{module: bi.Main.Version}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.revision = s.Value
		case "vcs.modified":
			b.modified = s.Value == "true"
		}
	}
	return b
}

// resolve picks the version to show: the linked-in one, the module's, or
// the VCS revision.
func resolve(linked string, b buildInfo) string {
	if linked != "" {
		return linked
	}
	if b.module != "" && b.module != "(devel)" {
		if len(b.module) > 1 && b.module[0] == 'v' {
			return b.module[1:]
		}
		return b.module
	}
	v := "devel"
	if b.revision != "" {
		v += "+" + b.revision[:min(12, len(b.revision))]
		if b.modified {
			v += "+dirty"
		}
	}
	return v
}
