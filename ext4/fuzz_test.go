package ext4

import (
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/nixvm-image/nixvm-image/testkit/testutil"
)

// fuzzTree turns bytes into a tree: three bytes per entry choose its kind,
// parent, name, size or target.
func fuzzTree(data []byte) []tfile {
	var tr []tfile
	dirs := []string{""}
	var files []string
	join := func(d, n string) string {
		if d == "" {
			return n
		}
		return d + "/" + n
	}
	for i := 0; i+2 < len(data) && len(tr) < 3000; i += 3 {
		op, a, b := data[i]%6, data[i+1], data[i+2]
		parent := dirs[int(a)%len(dirs)]
		name := fmt.Sprintf("%c%d", 'a'+b%26, i)
		if b&0x80 != 0 {
			name += strings.Repeat(string(rune('A'+a%26)), int(b)&0x7f+int(a)%128)
		}
		name = name[:min(len(name), 180)]
		p := join(parent, name)
		switch op {
		case 0:
			tr = append(tr, dir(p, 0o700|uint32(a)&0o7077))
			dirs = append(dirs, p)
		case 1:
			size := int64(a) * int64(b) * int64(1+b%17)
			tr = append(tr, reg(p, uint32(b)<<3&0o7777|0o400, size, a))
			files = append(files, p)
		case 2:
			tr = append(tr, symlink(p, strings.Repeat("t", 1+int(a)*int(b)%3000)))
			files = append(files, p)
		case 3:
			if len(files) > 0 {
				tr = append(tr, hardlink(p, files[int(b)%len(files)]))
			}
		case 4:
			// A burst of entries in one directory: htree indexes.
			for j := 0; j < int(b)*4; j++ {
				tr = append(tr, reg(fmt.Sprintf("%s-%d-%s", p, j, strings.Repeat("x", int(a)%64)), 0o644, int64(j%5), byte(j)))
			}
		case 5:
			tr = append(tr, tfile{h: Header{Name: p, Type: TypeReg, Mode: 0o644, Uid: uint32(a) << 10, Gid: uint32(b), Mtime: int64(a)<<32 | int64(b)}})
		}
	}
	return tr
}

func FuzzWriter(f *testing.F) {
	f.Add([]byte{0, 0, 1, 1, 1, 2, 2, 0, 3, 3, 0, 0})
	f.Add([]byte{0, 0, 0x81, 4, 1, 200, 1, 9, 9, 2, 50, 60, 3, 0, 0})
	f.Add([]byte{4, 40, 255, 0, 1, 1, 4, 2, 255})
	f.Fuzz(func(t *testing.T, data []byte) {
		tree := fuzzTree(data)
		img, _, err := build(t, tree, testOpts(64<<20))
		if err != nil {
			if errors.Is(err, ErrNoSpace) {
				return
			}
			t.Fatalf("build: %v", err)
		}
		if _, err := testutil.LookTool("e2fsck"); err != nil {
			return
		}
		e2fsck(t, img)
		if _, err := exec.LookPath("debugfs"); err == nil || testutil.SkipDisallowed() {
			compareTree(t, rdump(t, img), tree, checkFlags{})
		}
	})
}
