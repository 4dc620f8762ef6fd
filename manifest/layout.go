package manifest

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Section type 0x00000003 (optional, at most once) is the layout map of the
// image's root file system (see Layout), so that the next build can keep
// every unchanged store path where it is without reading this image:
//
//	0       8     root file system offset in bytes within the disk
//	8       8     root file system size in bytes
//	16      16    ext4 UUID
//	32      16    ext4 directory hash seed
//	48      ...   uvarint length and the lineage (see Layout.Lineage),
//	              uvarint U, the number of units, then U units in strictly
//	              ascending byte order of their names, each being
//	              uvarint name length, the name,
//	              uvarint I, then I inode runs (uvarint start, uvarint length),
//	              uvarint B, then B block runs (uvarint start, uvarint length);
//	              lengths are at least 1
//
// The section ends after the last unit. Readers of version 1 that predate
// it skip it.
const sectionLayout = 0x00000003

const layoutHdrLen = 48

// Layout is where a build put the units of its root file system (ext4):
// for each unit (a store path's base name, "" for the directories above
// the store, or another name the builder chose for a file outside it) the
// inode numbers and 4 KiB file system blocks it used, in allocation order.
type Layout struct {
	RootOffset int64    // byte offset of the root file system in the disk
	RootSize   int64    // its size in bytes
	Lineage    string   // what the disk's identifiers (partition IDs, UUIDs) derive from
	UUID       [16]byte // ext4 UUID
	HashSeed   [16]byte // ext4 htree hash seed
	Units      []Unit   // sorted by Name, unique
}

// Unit is one unit of a Layout.
type Unit struct {
	Name   string
	Inodes []Run
	Blocks []Run
}

// Run is [Start, Start+Len) of inode or block numbers.
type Run struct {
	Start, Len uint64
}

// Validate checks the order of the units and the runs' lengths.
func (l *Layout) Validate() error {
	if l.RootOffset < 0 || l.RootSize < 0 {
		return fmt.Errorf("%w: layout: root file system at %d of %d bytes", ErrInvalid, l.RootOffset, l.RootSize)
	}
	for i, u := range l.Units {
		if i > 0 && l.Units[i-1].Name >= u.Name {
			return fmt.Errorf("%w: layout: unit %q after %q, want strictly ascending names", ErrInvalid, u.Name, l.Units[i-1].Name)
		}
		for _, rs := range [][]Run{u.Inodes, u.Blocks} {
			for _, r := range rs {
				if r.Len == 0 || r.Start+r.Len < r.Start {
					return fmt.Errorf("%w: layout: unit %q: run %d+%d", ErrInvalid, u.Name, r.Start, r.Len)
				}
			}
		}
	}
	return nil
}

// Unit returns the unit called name, or nil.
func (l *Layout) Unit(name string) *Unit {
	lo, hi := 0, len(l.Units)
	for lo < hi {
		m := (lo + hi) / 2
		if l.Units[m].Name < name {
			lo = m + 1
		} else {
			hi = m
		}
	}
	if lo < len(l.Units) && l.Units[lo].Name == name {
		return &l.Units[lo]
	}
	return nil
}

func (l *Layout) encode() []byte {
	var b bytes.Buffer
	var hdr [layoutHdrLen]byte
	binary.BigEndian.PutUint64(hdr[0:], uint64(l.RootOffset))
	binary.BigEndian.PutUint64(hdr[8:], uint64(l.RootSize))
	copy(hdr[16:], l.UUID[:])
	copy(hdr[32:], l.HashSeed[:])
	b.Write(hdr[:])
	uv := func(v uint64) { b.Write(binary.AppendUvarint(nil, v)) }
	uv(uint64(len(l.Lineage)))
	b.WriteString(l.Lineage)
	uv(uint64(len(l.Units)))
	for _, u := range l.Units {
		uv(uint64(len(u.Name)))
		b.WriteString(u.Name)
		for _, rs := range [][]Run{u.Inodes, u.Blocks} {
			uv(uint64(len(rs)))
			for _, r := range rs {
				uv(r.Start)
				uv(r.Len)
			}
		}
	}
	return b.Bytes()
}

func decodeLayout(s []byte) (*Layout, error) {
	if len(s) < layoutHdrLen {
		return nil, fmt.Errorf("%w: layout header of %d bytes, want %d", ErrCorrupt, len(s), layoutHdrLen)
	}
	l := &Layout{
		RootOffset: int64(binary.BigEndian.Uint64(s[0:])),
		RootSize:   int64(binary.BigEndian.Uint64(s[8:])),
	}
	copy(l.UUID[:], s[16:32])
	copy(l.HashSeed[:], s[32:48])
	d := &uvarints{s: s[layoutHdrLen:]}
	lineage, err := d.bytes(d.uv("lineage length"), "lineage")
	if err != nil {
		return nil, err
	}
	l.Lineage = string(lineage)
	// Every unit takes at least 3 bytes, every run 2: counts beyond what
	// is left are corrupt, and allocations follow the input.
	nu := d.uv("unit count")
	if d.err == nil && nu > uint64(len(d.s))/3 {
		return nil, fmt.Errorf("%w: layout: %d units in %d bytes", ErrCorrupt, nu, len(d.s))
	}
	l.Units = make([]Unit, 0, nu)
	for i := uint64(0); i < nu && d.err == nil; i++ {
		u, err := d.unit()
		if err != nil {
			return nil, err
		}
		l.Units = append(l.Units, u)
	}
	if d.err != nil {
		return nil, d.err
	}
	if len(d.s) != 0 {
		return nil, fmt.Errorf("%w: layout: %d bytes after the last unit", ErrCorrupt, len(d.s))
	}
	if err := l.Validate(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return l, nil
}

// uvarints reads a layout section's varints; the first error sticks.
type uvarints struct {
	s   []byte
	err error
}

// uv reads a varint, what it is naming it in the error.
func (d *uvarints) uv(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.s)
	if n <= 0 {
		d.err = fmt.Errorf("%w: layout: bad %s", ErrCorrupt, what)
		return 0
	}
	d.s = d.s[n:]
	return v
}

// bytes reads n bytes of a field named what.
func (d *uvarints) bytes(n uint64, what string) ([]byte, error) {
	if d.err != nil {
		return nil, d.err
	}
	if n > uint64(len(d.s)) {
		return nil, fmt.Errorf("%w: layout: %s of %d bytes, %d left", ErrCorrupt, what, n, len(d.s))
	}
	b := d.s[:n]
	d.s = d.s[n:]
	return b, nil
}

// unit reads a unit: its name, inode runs and block runs.
func (d *uvarints) unit() (Unit, error) {
	name, err := d.bytes(d.uv("name length"), "name")
	if err != nil {
		return Unit{}, err
	}
	u := Unit{Name: string(name)}
	for _, rs := range []*[]Run{&u.Inodes, &u.Blocks} {
		nr := d.uv("run count")
		if d.err == nil && nr > uint64(len(d.s))/2 {
			return Unit{}, fmt.Errorf("%w: layout: unit %q: %d runs in %d bytes", ErrCorrupt, u.Name, nr, len(d.s))
		}
		if nr > 0 {
			*rs = make([]Run, 0, nr)
		}
		for j := uint64(0); j < nr && d.err == nil; j++ {
			r := Run{d.uv("run start"), d.uv("run length")}
			*rs = append(*rs, r)
		}
	}
	return u, d.err
}
