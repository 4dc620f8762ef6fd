package deps

import (
	_ "github.com/diskfs/go-diskfs"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/lima-vm/go-qcow2reader"
	_ "github.com/schollz/progressbar/v3"
	_ "github.com/spf13/pflag"
	_ "github.com/zeebo/blake3"
	_ "golang.org/x/sys/unix"
	_ "modernc.org/sqlite"
)
