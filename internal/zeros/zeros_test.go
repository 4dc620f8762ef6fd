package zeros

import "testing"

func TestAll(t *testing.T) {
	for n := 0; n < 100; n++ {
		b := make([]byte, n)
		if !All(b) {
			t.Fatalf("All(%d zero bytes) = false", n)
		}
		for i := range n {
			b[i] = 1
			if All(b) {
				t.Fatalf("All with byte %d of %d set = true", i, n)
			}
			b[i] = 0
		}
	}
}
