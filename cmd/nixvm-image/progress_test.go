package main

import (
	"bytes"
	"fmt"
	"testing"
)

func TestProgressLine(t *testing.T) {
	for _, tc := range []struct {
		name        string
		done, total int64
		note, want  string
	}{
		{"write store", 512 << 20, 1 << 30, "", "write store  [===============               ]  50% 512.0 MiB of 1.0 GiB"},
		{"athens", 3 << 30, 2 << 30, "sent 1.0 MiB", "athens       [==============================] 100% 3.0 GiB of 2.0 GiB, sent 1.0 MiB"},
		{"hashing", 4096, -1, "", "hashing      4.0 KiB"},
		{"copying", 0, 0, "", "copying      0 B"},
	} {
		if got := progressLine(tc.name, tc.done, tc.total, tc.note); got != tc.want {
			t.Errorf("progressLine(%q, %d, %d, %q):\ngot  %q\nwant %q", tc.name, tc.done, tc.total, tc.note, got, tc.want)
		}
	}
}

// TestRendererTerminal: on a terminal every draw replaces the lines drawn
// before, a step line erases them first, and stop draws the final state.
func TestRendererTerminal(t *testing.T) {
	var out bytes.Buffer
	n := 0
	r := newRenderer(&out, true, func() []string {
		n++
		return []string{fmt.Sprint("a", n), fmt.Sprint("b", n)}
	})
	r.draw()
	r.draw()
	r.write(&out, []byte("step\n"))
	r.stop()
	r.stop() // idempotent
	got := out.String()
	want := "\r\x1b[2Ka1\n\r\x1b[2Kb1\n" + // first draw
		"\x1b[2A\x1b[J\r\x1b[2Ka2\n\r\x1b[2Kb2\n" + // over the first
		"\x1b[2A\x1b[Jstep\n" + // erased before the step line
		"\r\x1b[2Ka3\n\r\x1b[2Kb3\n" // final, below the step line
	if got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

// TestRendererPlain: without a terminal, lines are printed as they are,
// step lines pass through, and stop adds nothing.
func TestRendererPlain(t *testing.T) {
	var out bytes.Buffer
	p := &progress{}
	p.r = newRenderer(&out, false, p.lines)
	p.Phase("write store", 1000)
	p.Add(250)
	p.r.draw()
	logWriter(&out, p).Write([]byte("step\n"))
	p.Phase("pack qcow2", 2000)
	p.Add(2000)
	p.r.draw()
	p.finish()
	want := "write store  [=======                       ]  25% 250 B of 1000 B\n" +
		"step\n" +
		"pack qcow2   [==============================] 100% 2.0 KiB of 2.0 KiB\n"
	if got := out.String(); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

// TestHostProgressQuiet: --quiet draws nothing.
func TestHostProgressQuiet(t *testing.T) {
	var out bytes.Buffer
	p := newHostProgress(&out, true, []string{"athens", "rome"})
	p.total[0] = 100
	p.done[0].Add(50)
	p.run(nil)()
	if out.Len() != 0 {
		t.Errorf("quiet progress wrote %q", out.String())
	}
}
