package qcow

import (
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/lima-vm/go-qcow2reader/image/qcow2"
)

var registerOnce sync.Once

// RegisterReaderCodecs teaches go-qcow2reader the cluster codecs it does not
// carry itself: zstd (compression_type 1), which this package writes by
// default. go-qcow2reader keeps its codecs in a package-level table, so this
// is the one place that fills it: call it before opening an image with
// go-qcow2reader. It is idempotent and safe to call from several goroutines.
func RegisterReaderCodecs() {
	registerOnce.Do(func() {
		qcow2.SetDecompressor(qcow2.CompressionTypeZstd, func(r io.Reader) (io.ReadCloser, error) {
			d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1))
			if err != nil {
				return nil, err
			}
			return d.IOReadCloser(), nil
		})
	})
}
