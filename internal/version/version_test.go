package version

import (
	"runtime"
	"strings"
	"testing"
)

func TestResolve(t *testing.T) {
	for _, tc := range []struct {
		linked string
		b      buildInfo
		want   string
	}{
		{"0.1.0", buildInfo{module: "v9.9.9", revision: "abc"}, "0.1.0"},
		{"", buildInfo{module: "v0.2.0"}, "0.2.0"},
		{"", buildInfo{module: "(devel)", revision: "0123456789abcdef0123"}, "devel+0123456789ab"},
		{"", buildInfo{module: "(devel)", revision: "0123456789abcdef0123", modified: true}, "devel+0123456789ab+dirty"},
		{"", buildInfo{module: "(devel)"}, "devel"},
		{"", buildInfo{}, "devel"},
	} {
		if got := resolve(tc.linked, tc.b); got != tc.want {
			t.Errorf("resolve(%q, %+v) = %q, want %q", tc.linked, tc.b, got, tc.want)
		}
	}
}

func TestString(t *testing.T) {
	s := String("nixvm-resize")
	if !strings.HasPrefix(s, "nixvm-resize ") || !strings.HasSuffix(s, "("+runtime.Version()+" "+runtime.GOOS+"/"+runtime.GOARCH+")") {
		t.Errorf("String: %q", s)
	}
}
