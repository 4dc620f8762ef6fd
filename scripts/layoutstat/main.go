// Command layoutstat compares an image's manifest with previous ones, for
// scripts/bench-layout and by hand:
//
//	go run ./scripts/layoutstat NEW.manifest OLD.manifest [OLDER.manifest...]
//
// It prints one line of key=value pairs: blocks (of NEW), differ (blocks
// whose hash differs from OLD's at the same index), send (non-zero blocks
// of NEW whose hash is in no OLD manifest: what a push to a host holding
// the old images sends at most), and, from NEW's layout map, newunits (units
// not in OLD's map) and newblocks (their blocks).
package main

import (
	"fmt"
	"os"

	"github.com/nixvm-image/nixvm-image/manifest"
)

func read(name string) *manifest.Manifest {
	f, err := os.Open(name)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	m, err := manifest.Read(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
	return m
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: layoutstat NEW.manifest OLD.manifest [OLDER.manifest...]")
		os.Exit(2)
	}
	nw := read(os.Args[1])
	old := read(os.Args[2])
	have := map[manifest.Hash]bool{}
	for _, name := range os.Args[2:] {
		for _, h := range read(name).Blocks {
			have[h] = true
		}
	}
	send := 0
	for _, h := range nw.Blocks {
		if h != manifest.ZeroHash() && !have[h] {
			send++
			have[h] = true
		}
	}
	newUnits, newBlocks := 0, uint64(0)
	if nw.Layout != nil {
		for _, u := range nw.Layout.Units {
			if old.Layout != nil && old.Layout.Unit(u.Name) != nil {
				continue
			}
			newUnits++
			for _, r := range u.Blocks {
				newBlocks += r.Len
			}
		}
	}
	fmt.Printf("blocks=%d differ=%d send=%d newunits=%d newblocks=%d\n",
		len(nw.Blocks), len(manifest.Diff(old, nw)), send, newUnits, newBlocks)
	if os.Getenv("LAYOUTSTAT_VERBOSE") != "" && nw.Layout != nil {
		// Which unit of the new image owns each differing block.
		owner := map[int64]string{}
		base := nw.Layout.RootOffset / manifest.BlockSize
		for _, u := range nw.Layout.Units {
			for _, r := range u.Blocks {
				for b := r.Start; b < r.Start+r.Len; b++ {
					owner[base+int64(b)] = u.Name
				}
			}
		}
		count := map[string]int{}
		for _, i := range manifest.Diff(old, nw) {
			n, ok := owner[i]
			if !ok {
				n = fmt.Sprintf("(no unit: fs block %d)", i-base)
			}
			count[n]++
		}
		for n, c := range count {
			fmt.Printf("  %6d %q\n", c, n)
		}
	}
}
