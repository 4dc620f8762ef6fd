package busyboxvm

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nixvm-image/nixvm-image/cpio"
)

// File is a host file or literal content placed in the initramfs.
type File struct {
	Path     string // path in the initramfs, e.g. "bin/nixvm-resize"
	HostPath string // copied from here, or
	Data     []byte // this content
	Mode     uint32 // permission bits; 0 means 0755
}

// InitramfsConfig says what goes into an initramfs.
type InitramfsConfig struct {
	Busybox string   // "" means /bin/busybox (Debian busybox-static)
	Script  string   // shell commands run by /init after mounting /proc, /sys, /dev and loading Modules
	Modules []Module // loaded with insmod in this order
	Files   []File
}

const initPrelude = `#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /mnt
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m || echo "vmtest: insmod $m failed"; done
mdev -s 2>/dev/null
`

// doneMarker ends every guest script; Run wants it.
const doneMarker = "@@vmtest-done"

const initEpilogue = `
echo "` + doneMarker + `"
sync
reboot -f
`

// BuildInitramfs writes an uncompressed newc initramfs to w: busybox with a
// link per applet, the modules, the files, and /init running cfg.Script.
// The same cfg gives the same bytes.
func BuildInitramfs(w io.Writer, cfg InitramfsConfig) error {
	bb := cfg.Busybox
	if bb == "" {
		bb = "/bin/busybox"
	}
	iw := &initramfs{cw: cpio.NewWriter(w), dirs: map[string]bool{}}
	for _, d := range []string{"dev", "proc", "sys", "tmp", "mnt", "etc", "lib/modules"} {
		if err := iw.mkdirs(d); err != nil {
			return err
		}
	}
	if err := iw.cw.WriteHeader(&cpio.Header{Name: "dev/console", Mode: cpio.TypeChar | 0o600, RDevMajor: 5, RDevMinor: 1, MTime: 1}); err != nil {
		return err
	}
	if err := iw.busybox(bb); err != nil {
		return err
	}
	if err := iw.modules(cfg.Modules); err != nil {
		return err
	}
	if err := iw.files(cfg.Files); err != nil {
		return err
	}
	if err := iw.file("init", 0o755, []byte(initPrelude+cfg.Script+initEpilogue)); err != nil {
		return err
	}
	return iw.cw.Close()
}

// initramfs writes the archive, each directory once, before its entries.
type initramfs struct {
	cw   *cpio.Writer
	dirs map[string]bool
}

func (iw *initramfs) mkdirs(p string) error {
	if p == "." || p == "" || iw.dirs[p] {
		return nil
	}
	if err := iw.mkdirs(filepath.Dir(p)); err != nil {
		return err
	}
	iw.dirs[p] = true
	return iw.cw.WriteHeader(&cpio.Header{Name: p, Mode: cpio.TypeDir | 0o755, MTime: 1})
}

func (iw *initramfs) file(name string, mode uint32, data []byte) error {
	if err := iw.mkdirs(filepath.Dir(name)); err != nil {
		return err
	}
	if err := iw.cw.WriteHeader(&cpio.Header{Name: name, Mode: mode, MTime: 1, Size: int64(len(data))}); err != nil {
		return err
	}
	_, err := iw.cw.Write(data)
	return err
}

// busybox adds the binary at bb as bin/busybox and a symlink to it for
// each applet it lists.
func (iw *initramfs) busybox(bb string) error {
	out, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busyboxvm: %s --list-full: %w (is it busybox-static?)", bb, err)
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		return fmt.Errorf("busyboxvm: %w", err)
	}
	if err := iw.file("bin/busybox", 0o755, data); err != nil {
		return err
	}
	applets := strings.Fields(string(out))
	sort.Strings(applets)
	for _, a := range applets {
		a = strings.TrimPrefix(a, "/")
		if a == "bin/busybox" || a == "init" || a == "linuxrc" {
			continue
		}
		if err := iw.mkdirs(filepath.Dir(a)); err != nil {
			return err
		}
		rel, _ := filepath.Rel(filepath.Dir(a), "bin/busybox")
		if err := iw.cw.WriteHeader(&cpio.Header{Name: a, Mode: cpio.TypeSymlink | 0o777, MTime: 1, Linkname: rel}); err != nil {
			return err
		}
	}
	return nil
}

// modules adds the modules under lib/modules and their load order.
func (iw *initramfs) modules(mods []Module) error {
	var order []string
	for _, m := range mods {
		if err := iw.file("lib/modules/"+m.Name, 0o644, m.Data); err != nil {
			return err
		}
		order = append(order, m.Name)
	}
	return iw.file("etc/modules.order", 0o644, []byte(strings.Join(order, "\n")+"\n"))
}

func (iw *initramfs) files(files []File) error {
	for _, f := range files {
		data := f.Data
		if f.HostPath != "" {
			var err error
			if data, err = os.ReadFile(f.HostPath); err != nil {
				return fmt.Errorf("busyboxvm: %w", err)
			}
		}
		mode := f.Mode
		if mode == 0 {
			mode = 0o755
		}
		if err := iw.file(strings.TrimPrefix(f.Path, "/"), mode, data); err != nil {
			return err
		}
	}
	return nil
}
