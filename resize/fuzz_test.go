package resize

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"testing"
)

// memDisk is a disk in memory.
type memDisk struct{ b []byte }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(m.b)) {
		return 0, io.EOF
	}
	n := copy(p, m.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, fmt.Errorf("write at %d+%d beyond the disk's %d bytes", off, len(p), len(m.b))
	}
	return copy(m.b[off:], p), nil
}
func (m *memDisk) Sync() error  { return nil }
func (m *memDisk) Close() error { return nil }

// FuzzTable feeds arbitrary first and last sectors to the table code: it
// must not panic, and whenever it plans and applies a grow, planning again
// finds nothing to do (idempotence) and a third pass writes nothing.
func FuzzTable(f *testing.F) {
	for _, seed := range tableSeeds(f) {
		f.Add(seed.head, seed.growBy, uint8(1))
	}
	f.Fuzz(func(t *testing.T, head []byte, growBy uint16, pno uint8) {
		const ss = 512
		n := uint64(len(head)/ss) + uint64(growBy)
		if n < 64 || n > 1<<13 || pno == 0 || pno > 8 {
			t.Skip()
		}
		d := &memDisk{b: make([]byte, n*ss)}
		copy(d.b, head)
		p, err := planTable(d, ss, n, int(pno))
		if err != nil {
			if !errors.Is(err, ErrLeftAlone) && !errors.Is(err, ErrCorruptTable) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if p.newEnd < p.oldEnd || p.newEnd >= n {
			t.Fatalf("plan end %d (old %d) outside the disk of %d sectors", p.newEnd, p.oldEnd, n)
		}
		if err := p.apply(d, func(string, ...any) {}); err != nil {
			t.Fatal(err)
		}
		p2, err := planTable(d, ss, n, int(pno))
		if err != nil {
			t.Fatalf("after apply: %v", err)
		}
		if !p2.upToDate() {
			t.Fatalf("after apply: not up to date: end %d -> %d, fixes %q", p2.oldEnd, p2.newEnd, p2.tableFixes)
		}
		if p2.newEnd != p.newEnd {
			t.Fatalf("after apply: end got %d, want %d", p2.newEnd, p.newEnd)
		}
	})
}

type tableSeed struct {
	head   []byte
	growBy uint16
}

// tableSeeds are small GPT and MBR disks written by our own code from a
// template, so the fuzzer starts from valid tables.
func tableSeeds(t testing.TB) []tableSeed {
	const ss, sectors = 512, 4096
	var seeds []tableSeed
	// MBR: one partition from 2048, 1024 sectors.
	mbr := make([]byte, sectors*ss)
	mbr[510], mbr[511] = 0x55, 0xaa
	e := mbr[446:]
	e[4] = 0x83
	putLE32(e[8:], 2048)
	putLE32(e[12:], 1024)
	seeds = append(seeds, tableSeed{mbr[:ss], 3000})

	// GPT: build a valid one by letting applyGPT write it on a disk whose
	// "old" table is only what the plan needs.
	g := &memDisk{b: make([]byte, sectors*ss)}
	g.b[510], g.b[511] = 0x55, 0xaa
	g.b[446+4] = 0xee
	putLE32(g.b[446+8:], 1)
	putLE32(g.b[446+12:], sectors-1)
	hdr := make([]byte, ss)
	copy(hdr, gptSig)
	putLE32(hdr[8:], 0x00010000)
	putLE32(hdr[12:], 92)
	putLE64(hdr[40:], 34)
	putLE64(hdr[72:], 2)
	putLE32(hdr[80:], 128)
	putLE32(hdr[84:], 128)
	ents := make([]byte, 128*128)
	ents[0] = 1 // a non-zero type GUID
	putLE64(ents[32:], 2048)
	putLE64(ents[40:], 3000)
	p := &plan{table: "gpt", pno: 1, start: 2048, oldEnd: 3000, newEnd: 3000, ss: ss, diskSectors: sectors,
		gptHdr: hdr, gptEntries: ents, entrySize: 128, entryLBA: 2, mbr: g.b[:ss]}
	if err := p.applyGPT(g, func(string, ...any) {}); err != nil {
		t.Fatal(err)
	}
	if _, err := planTable(g, ss, sectors, 1); err != nil {
		t.Fatalf("seed GPT does not parse: %v", err)
	}
	head := bytes.Clone(g.b[:34*ss])
	seeds = append(seeds, tableSeed{head, sectors - 34}, tableSeed{head, 8000})
	return seeds
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
func putLE64(b []byte, v uint64) { putLE32(b, uint32(v)); putLE32(b[4:], uint32(v>>32)) }
