package kernel

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
)

var (
	setRE   = regexp.MustCompile(`^(CONFIG_[A-Za-z0-9_]+)=(.*)$`)
	unsetRE = regexp.MustCompile(`^# (CONFIG_[A-Za-z0-9_]+) is not set$`)
)

// ParseConfig parses a kernel .config or a config fragment: lines
// "CONFIG_X=value" and "# CONFIG_X is not set" (value "n"); other comments
// and blank lines are skipped. An option given twice is an error, as is a
// line that is neither.
func ParseConfig(r io.Reader) (map[string]string, error) {
	opts := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		var name, val string
		if m := setRE.FindStringSubmatch(line); m != nil {
			name, val = m[1], m[2]
		} else if m := unsetRE.FindStringSubmatch(line); m != nil {
			name, val = m[1], "n"
		} else if line == "" || strings.HasPrefix(line, "#") {
			continue
		} else {
			return nil, fmt.Errorf("kernel config line %d: want CONFIG_X=value or \"# CONFIG_X is not set\", got %q", n, line)
		}
		if _, dup := opts[name]; dup {
			return nil, fmt.Errorf("kernel config line %d: %s given twice", n, name)
		}
		opts[name] = val
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading kernel config: %w", err)
	}
	return opts, nil
}

// CheckConfig reports every option of want (a fragment) that the merged
// config got does not have as asked: the kernel's olddefconfig silently
// drops an option whose dependencies are not met.
func CheckConfig(want, got map[string]string) error {
	var bad []string
	for name, w := range want {
		g, ok := got[name]
		if !ok {
			g = "n" // an option olddefconfig left out is off
		}
		if g != w {
			have := g
			if !ok {
				have = "unset"
			}
			bad = append(bad, fmt.Sprintf("%s=%s (merged: %s)", name, w, have))
		}
	}
	if len(bad) == 0 {
		return nil
	}
	sort.Strings(bad)
	return fmt.Errorf("the merged kernel config does not have what kiln.config asks for: %s: an option whose dependencies are off is dropped (see its \"depends on\" in the kernel's Kconfig files) and one that something selects cannot be turned off; fix kiln.config", strings.Join(bad, ", "))
}
