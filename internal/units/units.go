// Package units formats sizes for people: binary units, one decimal.
package units

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Bytes formats n as "512 B", "1.5 KiB", "2.0 GiB".
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// ParseSize parses a size such as 4G, 512M, 1.5GiB or 4096 (bytes). Units
// are binary: K, M, G, T, with an optional "i" and "B".
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, errors.New("empty size")
	}
	mult := int64(1)
	u := strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(s, "B"), "i"))
	if u == "" {
		return 0, fmt.Errorf("%q: no number", s)
	}
	switch u[len(u)-1] {
	case 'K':
		mult = 1 << 10
	case 'M':
		mult = 1 << 20
	case 'G':
		mult = 1 << 30
	case 'T':
		mult = 1 << 40
	}
	if mult > 1 {
		u = u[:len(u)-1]
	}
	f, err := strconv.ParseFloat(u, 64)
	if err != nil || f <= 0 || math.IsInf(f, 0) || f*float64(mult) >= math.MaxInt64 {
		return 0, fmt.Errorf("%q: not a positive size (examples: 4G, 512M, 4096)", s)
	}
	return int64(f * float64(mult)), nil
}
