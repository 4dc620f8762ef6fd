package qcow

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"github.com/lima-vm/go-qcow2reader"
)

// memWriterAt is an in-memory io.WriterAt.
type memWriterAt struct{ b []byte }

func (m *memWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	return copy(m.b[off:], p), nil
}

// TestRegisterReaderCodecs checks, in a process of its own (nothing else may
// have registered a codec), that go-qcow2reader cannot read a zstd image
// before RegisterReaderCodecs and reads it back exactly after, however often
// and from however many goroutines it is called: importing a package has no
// side effect on go-qcow2reader.
func TestRegisterReaderCodecs(t *testing.T) {
	if os.Getenv("NIXVM_QCOW_REGISTER_CHILD") == "" {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRegisterReaderCodecs$", "-test.v")
		cmd.Env = append(os.Environ(), "NIXVM_QCOW_REGISTER_CHILD=1")
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "child: ok") {
			t.Fatalf("child: %v\n%s", err, out)
		}
		return
	}
	data := bytes.Repeat([]byte("nixvm-image zstd cluster, 32 B\n"), 16384)
	var buf memWriterAt
	w, err := NewWriter(&buf, int64(len(data)), Options{Compression: Zstd})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	read := func() ([]byte, error) {
		img, err := qcow2reader.Open(bytes.NewReader(buf.b))
		if err != nil {
			return nil, err
		}
		defer img.Close()
		if err := img.Readable(); err != nil {
			return nil, err
		}
		got := make([]byte, len(data))
		if _, err := img.ReadAt(got, 0); err != nil && err != io.EOF {
			return nil, err
		}
		return got, nil
	}
	if _, err := read(); err == nil || !strings.Contains(err.Error(), "zstd") {
		t.Fatalf("before registration: got %v, want an error naming zstd (is a codec registered at init?)", err)
	}
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() { defer wg.Done(); RegisterReaderCodecs() }()
	}
	wg.Wait()
	RegisterReaderCodecs()
	got, err := read()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after registration: %v, equal %v", err, bytes.Equal(got, data))
	}
	t.Log("child: ok")
}
