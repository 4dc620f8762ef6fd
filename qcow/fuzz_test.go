package qcow

import (
	"bytes"
	"io"
	"testing"
)

// fuzzDisk turns fuzz input into writer options and a list of writes. Byte 0
// picks the compression, byte 1 the cluster size (512 B to 8 KiB), the rest
// is records: op&3 == 0 a gap of (op>>2)*512 bytes; 1 a run of the next byte,
// ((op>>2)+1)*97 long; 2 or 3 the next (op>>2)+1 bytes literally.
func fuzzDisk(in []byte) (Options, []byte, [][2]int) {
	if len(in) < 2 {
		return Options{}, nil, nil
	}
	opts := Options{Compression: Compression(in[0] % 3), ClusterBits: 9 + int(in[1]%5), Workers: 1 + int(in[0]>>6)}
	var disk []byte
	var writes [][2]int // [start, end) of each write
	const maxDisk = 1 << 20
	in = in[2:]
	for len(in) > 0 && len(disk) < maxDisk {
		op := in[0]
		in = in[1:]
		start := len(disk)
		switch op & 3 {
		case 0:
			disk = append(disk, make([]byte, int(op>>2)*512)...)
			continue
		case 1:
			if len(in) == 0 {
				break
			}
			disk = append(disk, bytes.Repeat(in[:1], (int(op>>2)+1)*97)...)
			in = in[1:]
		default:
			n := min(int(op>>2)+1, len(in))
			disk = append(disk, in[:n]...)
			in = in[n:]
		}
		writes = append(writes, [2]int{start, len(disk)})
	}
	size := (len(disk) + 511) &^ 511
	disk = append(disk, make([]byte, size-len(disk))...)
	return opts, disk, writes
}

func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte{0, 3, 1, 'a', 0x40, 10, 'h', 'e', 'l', 'l', 'o', 'x', 'y', 'z', 'w', 'v'})
	f.Add([]byte{1, 0, 0xfd, 7, 0xfc, 0xff, 1, 0})
	f.Add([]byte{2, 4, 0xfe, 1, 2, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		opts, disk, writes := fuzzDisk(in)
		if disk == nil {
			return
		}
		var m memFile
		w, err := NewWriter(&m, int64(len(disk)), opts)
		if err != nil {
			t.Fatal(err)
		}
		for _, wr := range writes {
			if _, err := w.WriteAt(disk[wr[0]:wr[1]], int64(wr[0])); err != nil {
				t.Fatalf("WriteAt(%d bytes at %d): %v", wr[1]-wr[0], wr[0], err)
			}
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		if int64(len(m.b)) != w.Stats().FileSize {
			t.Fatalf("file size: got %d, want %d", len(m.b), w.Stats().FileSize)
		}
		img := openQcow2(t, &m)
		if img.Size() != int64(len(disk)) {
			t.Fatalf("virtual size: got %d, want %d", img.Size(), len(disk))
		}
		got := readAll(t, img, 1<<opts.ClusterBits)
		if !bytes.Equal(got, disk) {
			t.Fatalf("read-back differs at byte %d (opts %+v)", firstDiff(got, disk), opts)
		}
	})
}

// discardAt is an io.WriterAt that drops everything.
type discardAt struct{}

func (discardAt) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// BenchmarkWriter measures throughput for 256 MiB of mixed data (zero,
// incompressible, text-like and sparse clusters) written in 1 MiB calls.
func BenchmarkWriter(b *testing.B) {
	const size = 256 << 20
	base := pattern(newRand(99), 16<<20, 1<<16)
	data := bytes.Repeat(base, size/len(base))
	for _, c := range []Compression{Zstd, Zlib, None} {
		b.Run(c.String(), func(b *testing.B) {
			b.SetBytes(size)
			var st Stats
			for b.Loop() {
				w, err := NewWriter(discardAt{}, size, Options{Compression: c})
				if err != nil {
					b.Fatal(err)
				}
				for off := 0; off < size; off += 1 << 20 {
					if _, err := w.WriteAt(data[off:off+1<<20], int64(off)); err != nil {
						b.Fatal(err)
					}
				}
				if err := w.Close(); err != nil {
					b.Fatal(err)
				}
				st = w.Stats()
			}
			b.ReportMetric(float64(st.FileSize)/size*100, "%size")
		})
	}
}

var _ io.WriterAt = discardAt{}
