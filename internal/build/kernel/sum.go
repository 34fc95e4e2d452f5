package kernel

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strings"
)

// Sum is what kiln.sum records about the kernel kiln.config builds: the
// fragment's digest, the source package, and the digest of the vmlinux that
// fragment and source give. A test compares a built kernel with it.
type Sum struct {
	Fragment      string // sha256 hex of kiln.config
	SourcePackage string // "linux-source-6.1"
	SourceVersion string // "6.1.192-3"
	Vmlinux       string // sha256 hex of the vmlinux
}

var hexRE = regexp.MustCompile(`^[0-9a-f]{64}$`)

// ParseSum parses kiln.sum: "fragment HEX", "source PACKAGE VERSION" and
// "vmlinux HEX" lines, each once, with # comments and blank lines.
func ParseSum(r io.Reader) (Sum, error) {
	var s Sum
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if seen[f[0]] {
			return Sum{}, fmt.Errorf("kiln.sum line %d: %s given twice", n, f[0])
		}
		seen[f[0]] = true
		switch {
		case f[0] == "fragment" && len(f) == 2 && hexRE.MatchString(f[1]):
			s.Fragment = f[1]
		case f[0] == "vmlinux" && len(f) == 2 && hexRE.MatchString(f[1]):
			s.Vmlinux = f[1]
		case f[0] == "source" && len(f) == 3 && validDebName(f[1]) && validDebVersion(f[2]):
			s.SourcePackage, s.SourceVersion = f[1], f[2]
		default:
			return Sum{}, fmt.Errorf("kiln.sum line %d: want \"fragment SHA256\", \"source PACKAGE VERSION\" or \"vmlinux SHA256\", got %q", n, line)
		}
	}
	if err := sc.Err(); err != nil {
		return Sum{}, fmt.Errorf("reading kiln.sum: %w", err)
	}
	if s.Fragment == "" || s.SourcePackage == "" || s.Vmlinux == "" {
		return Sum{}, fmt.Errorf("kiln.sum: want fragment, source and vmlinux lines")
	}
	return s, nil
}

var (
	debNameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	debVersionRE = regexp.MustCompile(`^[0-9][A-Za-z0-9.+~:-]*$`)
)

func validDebName(s string) bool    { return debNameRE.MatchString(s) }
func validDebVersion(s string) bool { return debVersionRE.MatchString(s) }
