// Package zeros answers one question fast: is this buffer all zero bytes?
package zeros

import "encoding/binary"

// All reports whether every byte of b is zero.
func All(b []byte) bool {
	for len(b) >= 32 {
		if binary.NativeEndian.Uint64(b)|binary.NativeEndian.Uint64(b[8:])|
			binary.NativeEndian.Uint64(b[16:])|binary.NativeEndian.Uint64(b[24:]) != 0 {
			return false
		}
		b = b[32:]
	}
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
