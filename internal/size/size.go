// Package size parses and formats byte sizes the way kiln's users write them: "512M" is 512 MiB.
package size

import (
	"fmt"
	"strconv"
	"strings"
)

// Parse parses a byte size: plain bytes ("536870912") or a number with a
// binary suffix K, M, G, T (also Ki, Mi, KB, MiB, …; case-insensitive), so
// "512M" is 512 MiB.
func Parse(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := 0
	for i < len(t) && t[i] >= '0' && t[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, fmt.Errorf("invalid size %q (want a number with an optional K, M or G suffix, like \"512M\")", s)
	}
	n, err := strconv.ParseInt(t[:i], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid size %q: number out of range", s)
	}
	var shift uint
	switch strings.ToLower(strings.TrimSpace(t[i:])) {
	case "", "b":
	case "k", "ki", "kb", "kib":
		shift = 10
	case "m", "mi", "mb", "mib":
		shift = 20
	case "g", "gi", "gb", "gib":
		shift = 30
	case "t", "ti", "tb", "tib":
		shift = 40
	default:
		return 0, fmt.Errorf("invalid size %q: unknown unit %q (use K, M or G)", s, t[i:])
	}
	if n > (1<<63-1)>>shift {
		return 0, fmt.Errorf("invalid size %q: too large", s)
	}
	return n << shift, nil
}

// Format formats a byte count for people (binary units).
func Format(n int64) string {
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
