package provision

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// openBlockExclusive opens the block device at path with O_EXCL, which the
// kernel refuses (EBUSY) while the device is mounted, used as swap, held by
// device-mapper, md or LVM (a PV), or opened exclusively by another
// process. A refusal is ErrInUse naming what holds the device, where
// /proc/self/mountinfo, /proc/swaps and /sys/dev/block/M:N/holders say.
func openBlockExclusive(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_EXCL|unix.O_CLOEXEC, 0)
	if err == nil {
		return f, nil
	}
	if !errors.Is(err, unix.EBUSY) {
		return nil, err
	}
	held := "another process opened it exclusively"
	if h := holders(path); len(h) > 0 {
		held = strings.Join(h, "; ")
	}
	return nil, fmt.Errorf("%w: block device %s is busy: %s; free it first", ErrInUse, path, held)
}

// holders describes what uses the block device at path: mounts, swap, and
// the kernel devices stacked on it.
func holders(path string) []string {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil
	}
	maj, min := unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev))
	var out []string
	out = append(out, mountsOf(fmt.Sprintf("%d:%d", maj, min))...)
	out = append(out, swapsOf(uint64(st.Rdev))...)
	ents, _ := os.ReadDir(fmt.Sprintf("/sys/dev/block/%d:%d/holders", maj, min))
	for _, e := range ents {
		what := e.Name()
		if b, err := os.ReadFile(filepath.Join("/sys/class/block", e.Name(), "dm", "name")); err == nil {
			what += " (device-mapper " + strings.TrimSpace(string(b)) + ")"
		}
		out = append(out, "held by "+what)
	}
	return out
}

// mountsOf lists the mount points of device majmin ("8:1") from
// /proc/self/mountinfo (field 3 is major:minor, field 5 the mount point).
func mountsOf(majmin string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) > 4 && fs[2] == majmin {
			out = append(out, "mounted on "+unescapeMount(fs[4]))
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// swapsOf reports whether /proc/swaps lists the device rdev.
func swapsOf(rdev uint64) []string {
	b, err := os.ReadFile("/proc/swaps")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n")[1:] {
		fs := strings.Fields(line)
		if len(fs) == 0 {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(unescapeMount(fs[0]), &st) == nil && uint64(st.Rdev) == rdev && st.Mode&unix.S_IFMT == unix.S_IFBLK {
			out = append(out, "used as swap")
		}
	}
	return out
}
