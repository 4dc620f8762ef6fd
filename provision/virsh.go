package provision

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrNoVolume reports a libvirt volume that does not exist.
var ErrNoVolume = errors.New("provision: no such libvirt volume")

// Virsh runs libvirt's virsh.
type Virsh struct {
	Program string // "" means "virsh"
	URI     string // passed as -c; "" means virsh's default (qemu:///system as root)
	Run     Runner // nil means ExecRunner
}

func (v *Virsh) do(ctx context.Context, args ...string) (string, error) {
	prog := v.Program
	if prog == "" {
		prog = "virsh"
	}
	argv := []string{prog, "-q"}
	if v.URI != "" {
		argv = append(argv, "-c", v.URI)
	}
	out, err := v.Run.run(ctx, append(argv, args...)...)
	return string(out), err
}

func notFound(err error) bool {
	s := stderrOf(err)
	return strings.Contains(s, "Storage volume not found") || strings.Contains(s, "no storage vol")
}

// VolPath returns the path of volume vol in pool, or ErrNoVolume.
func (v *Virsh) VolPath(ctx context.Context, pool, vol string) (string, error) {
	out, err := v.do(ctx, "vol-path", "--pool", pool, vol)
	if err != nil {
		if notFound(err) {
			return "", fmt.Errorf("%w: %s in pool %s", ErrNoVolume, vol, pool)
		}
		return "", err
	}
	p := strings.TrimSpace(out)
	if p == "" {
		return "", fmt.Errorf("provision: virsh vol-path %s --pool %s printed no path", vol, pool)
	}
	return p, nil
}

// VolCreate creates a raw volume of size bytes; sparse asks for no
// preallocation (--allocation 0), which file-backed pools (dir, fs, netfs)
// honour with a sparse file. Other pools get a fully allocated volume: a
// logical pool would otherwise make an LVM snapshot-backed "sparse" volume.
func (v *Virsh) VolCreate(ctx context.Context, pool, vol string, size int64, sparse bool) error {
	args := []string{"vol-create-as", pool, vol, strconv.FormatInt(size, 10)}
	if sparse {
		args = append(args, "--allocation", "0")
	}
	_, err := v.do(ctx, append(args, "--format", "raw")...)
	return err
}

// PoolType returns a pool's type (dir, logical, fs, ...) from its XML.
func (v *Virsh) PoolType(ctx context.Context, pool string) (string, error) {
	out, err := v.do(ctx, "pool-dumpxml", pool)
	if err != nil {
		return "", err
	}
	var x struct {
		Type string `xml:"type,attr"`
	}
	if err := xml.Unmarshal([]byte(out), &x); err != nil || x.Type == "" {
		return "", fmt.Errorf("provision: virsh pool-dumpxml %s: no pool type in %q: %v", pool, out, err)
	}
	return x.Type, nil
}

// VolDelete deletes a volume.
func (v *Virsh) VolDelete(ctx context.Context, pool, vol string) error {
	_, err := v.do(ctx, "vol-delete", "--pool", pool, vol)
	return err
}

// PoolRefresh makes libvirt re-read the pool (sizes, allocation).
func (v *Virsh) PoolRefresh(ctx context.Context, pool string) error {
	_, err := v.do(ctx, "pool-refresh", pool)
	return err
}

// PoolPaths returns the paths of every volume in pool.
func (v *Virsh) PoolPaths(ctx context.Context, pool string) ([]string, error) {
	out, err := v.do(ctx, "vol-list", "--pool", pool)
	if err != nil {
		return nil, err
	}
	return parseVolList(out), nil
}

// parseVolList reads `virsh -q vol-list` output: name, spaces, path.
func parseVolList(out string) []string {
	var paths []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "---") || (f[0] == "Name" && f[1] == "Path") {
			continue
		}
		// The path is the rest of the line after the name; names have no spaces.
		rest := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), f[0]))
		if strings.HasPrefix(rest, "/") {
			paths = append(paths, rest)
		}
	}
	return paths
}

// Domains returns the names of the running domains, or of all defined ones.
func (v *Virsh) Domains(ctx context.Context, all bool) ([]string, error) {
	args := []string{"list", "--name"}
	if all {
		args = append(args, "--all")
	}
	out, err := v.do(ctx, args...)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			names = append(names, l)
		}
	}
	return names, nil
}

// DomainDisks returns the source paths of a domain's disks (file and block
// disks; volume disks are reported by libvirt with their resolved path).
func (v *Virsh) DomainDisks(ctx context.Context, dom string) ([]string, error) {
	disks, err := v.domainDisks(ctx, dom)
	var srcs []string
	for _, d := range disks {
		srcs = append(srcs, d.Source)
	}
	return srcs, err
}

// domDisk is a line of domblklist: the disk's target (vda) and source path.
type domDisk struct{ Target, Source string }

func (v *Virsh) domainDisks(ctx context.Context, dom string) ([]domDisk, error) {
	out, err := v.do(ctx, "domblklist", "--details", dom)
	if err != nil {
		return nil, err
	}
	return parseDomblklistDisks(out), nil
}

// parseDomblklist reads `virsh -q domblklist --details` into source paths.
func parseDomblklist(out string) []string {
	var srcs []string
	for _, d := range parseDomblklistDisks(out) {
		srcs = append(srcs, d.Source)
	}
	return srcs
}

// parseDomblklistDisks reads `virsh -q domblklist --details`: type, device,
// target, source (the rest of the line; "-" for an empty drive).
func parseDomblklistDisks(out string) []domDisk {
	var disks []domDisk
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[0] == "Type" || strings.HasPrefix(f[0], "---") {
			continue
		}
		rest := strings.TrimSpace(line)
		for range 3 {
			rest = strings.TrimSpace(rest[len(strings.Fields(rest)[0]):])
		}
		if strings.HasPrefix(rest, "/") {
			disks = append(disks, domDisk{Target: f[2], Source: rest})
		}
	}
	return disks
}
