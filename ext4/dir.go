package ext4

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sort"

	"github.com/nixvm-image/nixvm-image/ext4/ondisk"
)

// Directory file types (ext4_dir_entry_2.file_type).
const (
	ftReg     = 1
	ftDir     = 2
	ftSymlink = 7
)

type dirent struct {
	name  string
	ino   uint32
	ftype uint8
}

type dirInfo struct {
	ino, parent uint32
	entries     []dirent // in header order, without "." and ".."
	subdirs     uint32
	unit        *unitState // the unit whose blocks it gets
}

const (
	leafSpace   = blockSize - 12 // a leaf block minus its checksum tail
	dxRootLimit = (blockSize-32)/8 - 1
	dxNodeLimit = (blockSize-8)/8 - 1
	dxHashHalf  = 1                     // DX_HASH_HALF_MD4; unsigned through s_flags
	dxRootCount = ondisk.DxRootInfo + 8 // limit/count after an 8-byte dx_root_info
	dxNodeCount = 8                     // limit/count after the fake entry
)

func recLen(nameLen int) int { return (8 + nameLen + 3) &^ 3 }

// pack splits entries greedily into leaf blocks, returning each block's
// first index and one past the last.
func pack(ents []dirent) [][2]int {
	var out [][2]int
	start, fill := 0, 0
	for i, e := range ents {
		r := recLen(len(e.name))
		if fill+r > leafSpace {
			out = append(out, [2]int{start, i})
			start, fill = i, 0
		}
		fill += r
	}
	out = append(out, [2]int{start, len(ents)})
	return out
}

// putLeaf serialises ents into a leaf block with its checksum tail.
func putLeaf(b []byte, ents []dirent, seed uint32) {
	clear(b)
	off := 0
	for i, e := range ents {
		r := recLen(len(e.name))
		if i == len(ents)-1 {
			r = leafSpace - off
		}
		binary.LittleEndian.PutUint32(b[off:], e.ino)
		binary.LittleEndian.PutUint16(b[off+4:], uint16(r))
		b[off+6] = uint8(len(e.name))
		b[off+7] = e.ftype
		copy(b[off+8:], e.name)
		off += r
	}
	if len(ents) == 0 {
		binary.LittleEndian.PutUint16(b[4:], leafSpace)
	}
	ondisk.PutDirTail(b, seed)
}

// buildDir returns the blocks of a directory (logical order) and whether it
// is hash-indexed. seed is the inode's checksum seed.
func buildDir(d *dirInfo, seed uint32, hashSeed [4]uint32) ([][]byte, bool, error) {
	all := make([]dirent, 0, len(d.entries)+2)
	all = append(all, dirent{".", d.ino, ftDir}, dirent{"..", d.parent, ftDir})
	all = append(all, d.entries...)
	if len(pack(all)) == 1 {
		b := make([]byte, blockSize)
		putLeaf(b, all, seed)
		return [][]byte{b}, false, nil
	}
	sorted, hashes := hashOrder(d.entries, hashSeed)
	leaves := pack(sorted)
	nl := len(leaves)
	nodes := 0
	if nl > dxRootLimit {
		nodes = (nl + dxNodeLimit - 1) / dxNodeLimit
		if nodes > dxRootLimit {
			return nil, false, fmt.Errorf("%w: directory inode %d has %d entries, more than two htree levels hold", ErrTooLarge, d.ino, len(d.entries))
		}
	}
	blocks := make([][]byte, 1+nodes+nl)
	leafHash := make([]uint32, nl)
	for i, l := range leaves {
		b := make([]byte, blockSize)
		putLeaf(b, sorted[l[0]:l[1]], seed)
		blocks[1+nodes+i] = b
		leafHash[i] = hashes[l[0]]
		if l[0] > 0 && hashes[l[0]-1] == hashes[l[0]] {
			leafHash[i] |= 1 // the previous leaf holds entries with the same hash
		}
	}
	if err := putIndex(blocks, d, leafHash, nodes, seed); err != nil {
		return nil, false, err
	}
	return blocks, true, nil
}

type hashedEnt struct {
	dirent
	hash, minor uint32
}

// hashOrder returns the entries in hash order (stable for equal hashes)
// and their hashes.
func hashOrder(ents []dirent, hashSeed [4]uint32) ([]dirent, []uint32) {
	hs := make([]hashedEnt, len(ents))
	for i, e := range ents {
		h, m := halfMD4Hash(e.name, hashSeed)
		hs[i] = hashedEnt{e, h, m}
	}
	sort.SliceStable(hs, func(i, j int) bool {
		if hs[i].hash != hs[j].hash {
			return hs[i].hash < hs[j].hash
		}
		return hs[i].minor < hs[j].minor
	})
	sorted := make([]dirent, len(hs))
	hashes := make([]uint32, len(hs))
	for i := range hs {
		sorted[i], hashes[i] = hs[i].dirent, hs[i].hash
	}
	return sorted, hashes
}

// putIndex makes the htree root (blocks[0]) and, with nodes > 0, the
// interior nodes after it, over the leaves that follow them.
func putIndex(blocks [][]byte, d *dirInfo, leafHash []uint32, nodes int, seed uint32) error {
	root := dxRoot(d)
	firstLeaf := 1 + nodes
	if nodes == 0 {
		putDxEntries(root, dxRootCount, dxRootLimit, leafHash, firstLeaf)
	} else {
		root[0x1E] = 1 // indirect_levels
		nodeHash := make([]uint32, nodes)
		for j := 0; j < nodes; j++ {
			lo, hi := j*dxNodeLimit, min((j+1)*dxNodeLimit, len(leafHash))
			nodeHash[j] = leafHash[lo]
			b := make([]byte, blockSize)
			binary.LittleEndian.PutUint16(b[4:], blockSize) // a fake entry spanning the block
			putDxEntries(b, dxNodeCount, dxNodeLimit, leafHash[lo:hi], firstLeaf+lo)
			if err := ondisk.SetDxChecksum(b, dxNodeCount, seed); err != nil {
				return fmt.Errorf("BUG: directory inode %d: %w", d.ino, err)
			}
			blocks[1+j] = b
		}
		putDxEntries(root, dxRootCount, dxRootLimit, nodeHash, 1)
	}
	if err := ondisk.SetDxChecksum(root, dxRootCount, seed); err != nil {
		return fmt.Errorf("BUG: directory inode %d: %w", d.ino, err)
	}
	blocks[0] = root
	return nil
}

// dxRoot returns an htree root block holding "." and ".." and its
// dx_root_info (half_md4, 8 bytes, no indirect level yet).
func dxRoot(d *dirInfo) []byte {
	root := make([]byte, blockSize)
	binary.LittleEndian.PutUint32(root[0:], d.ino)
	binary.LittleEndian.PutUint16(root[4:], 12)
	root[6], root[7] = 1, ftDir
	root[8] = '.'
	binary.LittleEndian.PutUint32(root[12:], d.parent)
	binary.LittleEndian.PutUint16(root[16:], blockSize-12)
	root[18], root[19] = 2, ftDir
	root[20], root[21] = '.', '.'
	root[ondisk.DxRootInfo+4] = dxHashHalf
	root[ondisk.DxRootInfo+5] = 8 // info_length
	return root
}

// putDxEntries writes an index's entries (hash, logical block) at off, the
// logical blocks numbered from first; the first entry's hash slot holds
// limit and count.
func putDxEntries(b []byte, off, limit int, hashes []uint32, first int) {
	binary.LittleEndian.PutUint16(b[off:], uint16(limit))
	binary.LittleEndian.PutUint16(b[off+2:], uint16(len(hashes)))
	for i := range hashes {
		if i > 0 {
			binary.LittleEndian.PutUint32(b[off+8*i:], hashes[i])
		}
		binary.LittleEndian.PutUint32(b[off+8*i+4:], uint32(first+i))
	}
}

// halfMD4Hash is the kernel's DX_HASH_HALF_MD4_UNSIGNED (fs/ext4/hash.c).
func halfMD4Hash(name string, seed [4]uint32) (hash, minor uint32) {
	buf := [4]uint32{0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476}
	if seed != [4]uint32{} {
		buf = seed
	}
	p := []byte(name)
	var in [8]uint32
	for l := len(p); l > 0; l -= 32 {
		str2hashbuf(p, l, in[:])
		halfMD4Transform(&buf, &in)
		if len(p) > 32 {
			p = p[32:]
		} else {
			p = nil
		}
	}
	hash = buf[1] &^ 1
	if hash == 0x7fffffff<<1 {
		hash = (0x7fffffff - 1) << 1
	}
	return hash, buf[2]
}

func str2hashbuf(msg []byte, l int, buf []uint32) {
	num := len(buf)
	pad := uint32(l) | uint32(l)<<8
	pad |= pad << 16
	val := pad
	if l > num*4 {
		l = num * 4
	}
	k := 0
	for i := 0; i < l; i++ {
		val = uint32(msg[i]) + val<<8
		if i%4 == 3 {
			buf[k] = val
			k++
			val = pad
			num--
		}
	}
	num--
	if num >= 0 {
		buf[k] = val
		k++
	}
	for num--; num >= 0; num-- {
		buf[k] = pad
		k++
	}
}

func halfMD4Transform(buf *[4]uint32, in *[8]uint32) {
	const (
		k2 = 013240474631
		k3 = 015666365641
	)
	f := func(x, y, z uint32) uint32 { return z ^ (x & (y ^ z)) }
	g := func(x, y, z uint32) uint32 { return (x & y) + ((x ^ y) & z) }
	h := func(x, y, z uint32) uint32 { return x ^ y ^ z }
	a, b, c, d := buf[0], buf[1], buf[2], buf[3]
	r := func(fn func(x, y, z uint32) uint32, a *uint32, b, c, d, x uint32, s int) {
		*a = bits.RotateLeft32(*a+fn(b, c, d)+x, s)
	}
	r(f, &a, b, c, d, in[0], 3)
	r(f, &d, a, b, c, in[1], 7)
	r(f, &c, d, a, b, in[2], 11)
	r(f, &b, c, d, a, in[3], 19)
	r(f, &a, b, c, d, in[4], 3)
	r(f, &d, a, b, c, in[5], 7)
	r(f, &c, d, a, b, in[6], 11)
	r(f, &b, c, d, a, in[7], 19)

	r(g, &a, b, c, d, in[1]+k2, 3)
	r(g, &d, a, b, c, in[3]+k2, 5)
	r(g, &c, d, a, b, in[5]+k2, 9)
	r(g, &b, c, d, a, in[7]+k2, 13)
	r(g, &a, b, c, d, in[0]+k2, 3)
	r(g, &d, a, b, c, in[2]+k2, 5)
	r(g, &c, d, a, b, in[4]+k2, 9)
	r(g, &b, c, d, a, in[6]+k2, 13)

	r(h, &a, b, c, d, in[3]+k3, 3)
	r(h, &d, a, b, c, in[7]+k3, 9)
	r(h, &c, d, a, b, in[2]+k3, 11)
	r(h, &b, c, d, a, in[6]+k3, 15)
	r(h, &a, b, c, d, in[1]+k3, 3)
	r(h, &d, a, b, c, in[5]+k3, 9)
	r(h, &c, d, a, b, in[0]+k3, 11)
	r(h, &b, c, d, a, in[4]+k3, 15)

	buf[0] += a
	buf[1] += b
	buf[2] += c
	buf[3] += d
}
