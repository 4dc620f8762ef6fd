// Package shquote quotes words for a POSIX shell, so that a command line
// shown to a user, or sent through ssh, runs unchanged.
package shquote

import "strings"

const safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=/.,:+@"

// Quote returns s as one shell word: unchanged when it holds only characters
// a shell leaves alone, else in single quotes.
func Quote(s string) string {
	if s != "" && strings.Trim(s, safe) == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// Join quotes each word of argv and joins them with spaces.
func Join(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = Quote(a)
	}
	return strings.Join(q, " ")
}
