package vmtest

import (
	"os"
	"path/filepath"
	"testing"
)

// TestKernel: the kernel found is readable and has its modules.
func TestKernel(t *testing.T) {
	path, rel := Kernel(t)
	if f, err := os.Open(path); err != nil {
		t.Errorf("kernel %s: %v", path, err)
	} else {
		f.Close()
	}
	if _, err := os.Stat(filepath.Join("/lib/modules", rel, "modules.dep")); err != nil && os.Getenv("NIXVM_VMTEST_KERNEL") == "" {
		t.Errorf("release %s: %v", rel, err)
	}
}
