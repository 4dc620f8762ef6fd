package vm

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"

	"github.com/nixvm-image/nixvm-image/cpio"
)

// Module is a kernel module ready for the initramfs.
type Module struct {
	Name string // file name in the initramfs, e.g. "virtio_blk.ko"
	Data []byte // uncompressed
}

// Modules resolves names (e.g. "virtio_blk", "ext4") with their dependencies
// through modulesDir/modules.dep and returns them in load order (each module
// after its dependencies). Names may use '-' or '_'. Modules built into the
// kernel (modules.builtin) are skipped, and so are names in optional that
// neither file lists. Compressed modules (.ko.zst in Go, .ko.xz with the xz
// tool) are decompressed on the host: the guest loads plain ELF.
func Modules(modulesDir string, names []string, optional map[string]bool) ([]Module, error) {
	db, err := readModulesDep(modulesDir)
	if err != nil {
		return nil, err
	}
	var order []string
	seen := map[string]bool{}
	var visit func(n, from string) error
	visit = func(n, from string) error {
		if seen[n] {
			return nil
		}
		seen[n] = true
		if _, ok := db.paths[n]; !ok {
			if db.builtin[n] || optional[n] {
				return nil
			}
			return fmt.Errorf("%w: %s%s is neither in %s/modules.dep nor in modules.builtin", ErrModules, n, from, modulesDir)
		}
		for _, d := range db.deps[n] {
			if err := visit(moduleName(d), " (needed by "+n+")"); err != nil {
				return err
			}
		}
		order = append(order, n)
		return nil
	}
	for _, n := range names {
		if err := visit(normModule(n), ""); err != nil {
			return nil, err
		}
	}
	mods := make([]Module, 0, len(order))
	for _, n := range order {
		data, err := readModule(filepath.Join(modulesDir, db.paths[n]))
		if err != nil {
			return nil, err
		}
		mods = append(mods, Module{Name: n + ".ko", Data: data})
	}
	return mods, nil
}

// modulesDep is what modules.dep and modules.builtin say, by module name.
type modulesDep struct {
	paths   map[string]string   // file, relative to the modules directory
	deps    map[string][]string // files of its dependencies
	builtin map[string]bool
}

func readModulesDep(dir string) (*modulesDep, error) {
	dep, err := os.ReadFile(filepath.Join(dir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrModules, err)
	}
	db := &modulesDep{paths: map[string]string{}, deps: map[string][]string{}, builtin: map[string]bool{}}
	for _, line := range strings.Split(string(dep), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		n := moduleName(k)
		db.paths[n] = k
		db.deps[n] = strings.Fields(v)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			db.builtin[moduleName(l)] = true
		}
	}
	return db, nil
}

// normModule writes a module name with '_' only, as the kernel does.
func normModule(s string) string { return strings.ReplaceAll(s, "-", "_") }

// moduleName is the module name of a module file's path.
func moduleName(p string) string {
	b := filepath.Base(p)
	if i := strings.Index(b, ".ko"); i >= 0 {
		b = b[:i]
	}
	return normModule(b)
}

func readModule(path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".ko.zst"):
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		d, err := zstd.NewReader(f)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		return io.ReadAll(d)
	case strings.HasSuffix(path, ".ko.xz"):
		// No xz decoder among our dependencies: use the tool.
		cmd := exec.Command("xz", "-dc", path)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return nil, fmt.Errorf("vm: xz -dc %s: %v: %s", path, err, stderr.Bytes())
		}
		return out, nil
	case strings.HasSuffix(path, ".ko.gz"):
		return nil, fmt.Errorf("vm: %s: gzip-compressed modules are not supported", path)
	}
	return os.ReadFile(path)
}

// GuestConfig tells the guest what to do. It is stored as JSON at
// guestConfigPath in the initramfs.
type GuestConfig struct {
	Modules []string // file names under /lib/modules, in load order
	Root    string   // the root partition, e.g. /dev/vda1
	ESP     string   // the ESP, mounted at /boot; "" when none
	Command []string // run in the chroot
	Env     []string
}

const guestConfigPath = "etc/nixvm-vm.json"

// CheckStatic returns ErrNotStatic when the ELF file at path asks for a
// dynamic loader: the initramfs has no libraries.
func CheckStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("vm: the VM's /init %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s is dynamically linked; build nixvm-image with CGO_ENABLED=0 (make build)", ErrNotStatic, path)
		}
	}
	return nil
}

// WriteInitramfs writes an uncompressed newc initramfs to w: init (a static
// binary) as /init, the modules under /lib/modules, and cfg. The same inputs
// give the same bytes.
func WriteInitramfs(w io.Writer, init []byte, mods []Module, cfg GuestConfig) error {
	cw := cpio.NewWriter(w)
	dir := func(name string) error {
		return cw.WriteHeader(&cpio.Header{Name: name, Mode: cpio.TypeDir | 0o755, MTime: 1})
	}
	file := func(name string, mode uint32, data []byte) error {
		if err := cw.WriteHeader(&cpio.Header{Name: name, Mode: cpio.TypeReg | mode, MTime: 1, Size: int64(len(data))}); err != nil {
			return err
		}
		_, err := cw.Write(data)
		return err
	}
	for _, d := range []string{"dev", "etc", "lib", "lib/modules", "mnt", "proc", "sys"} {
		if err := dir(d); err != nil {
			return err
		}
	}
	if err := cw.WriteHeader(&cpio.Header{Name: "dev/console", Mode: cpio.TypeChar | 0o600, RDevMajor: 5, RDevMinor: 1, MTime: 1}); err != nil {
		return err
	}
	cfg.Modules = cfg.Modules[:0:0]
	for _, m := range mods {
		if err := file("lib/modules/"+m.Name, 0o644, m.Data); err != nil {
			return err
		}
		cfg.Modules = append(cfg.Modules, m.Name)
	}
	js, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	if err := file(guestConfigPath, 0o644, append(js, '\n')); err != nil {
		return err
	}
	if err := file("init", 0o755, init); err != nil {
		return err
	}
	return cw.Close()
}
