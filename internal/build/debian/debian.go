// Package debian resolves, downloads and extracts Debian packages without installing them on the host.
package debian

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/kiln-dev/kiln/internal/cache"
)

// Show returns the control stanza of name's candidate version, as
// `apt-cache show --no-all-versions` prints it, parsed with net/textproto
// (Debian control files are RFC 822 style headers; continuation lines are
// joined).
func Show(ctx context.Context, name string) (textproto.MIMEHeader, error) {
	if !validName(name) {
		return nil, fmt.Errorf("invalid Debian package name %q", name)
	}
	cmd := exec.CommandContext(ctx, "apt-cache", "show", "--no-all-versions", name)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("apt-cache not found: Debian packages can only be fetched on a Debian-based host: %w", err)
		}
		if unableRe.MatchString(stderr.String()) || strings.Contains(stderr.String(), "No packages found") {
			return nil, &NotFoundError{Name: name}
		}
		return nil, fmt.Errorf("apt-cache show %s: %w: %s", name, err, tail(stderr.String(), 1000))
	}
	h, err := ParseControl(stdout.Bytes())
	if err != nil {
		return nil, fmt.Errorf("apt-cache show %s: %w", name, err)
	}
	if h.Get("Package") == "" {
		return nil, &NotFoundError{Name: name}
	}
	return h, nil
}

// ParseControl parses the first stanza of a Debian control file.
func ParseControl(b []byte) (textproto.MIMEHeader, error) {
	h, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(b))).ReadMIMEHeader()
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("parsing control stanza: %w", err)
	}
	return h, nil
}

// Package is one Debian binary package of a dependency closure.
type Package struct {
	Name    string
	Version string
	Arch    string
	// Deb is the path of the downloaded .deb in the cache (set by Download).
	Deb string
}

// NotFoundError reports a package name apt does not know.
type NotFoundError struct{ Name string }

func (e *NotFoundError) Error() string {
	return fmt.Sprintf("Debian package %q not found: check the name (apt-cache search %s) and run apt-get update", e.Name, e.Name)
}

var unableRe = regexp.MustCompile(`Unable to locate package (\S+)|Package '?([^'\s]+)'? has no installation candidate`)

// Resolve returns the full dependency closure of names as if nothing were
// installed on the host, in apt's install order. Recommends are not included.
func Resolve(ctx context.Context, names []string) ([]Package, error) {
	if len(names) == 0 {
		return nil, nil
	}
	for _, n := range names {
		if n == "" || strings.HasPrefix(n, "-") {
			return nil, fmt.Errorf("invalid Debian package name %q", n)
		}
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return nil, fmt.Errorf("apt-get not found: Debian packages can only be fetched on a Debian-based host: %w", err)
	}
	status, err := os.CreateTemp("", "kiln-apt-status-*")
	if err != nil {
		return nil, fmt.Errorf("creating empty dpkg status: %w", err)
	}
	status.Close()
	defer os.Remove(status.Name())

	args := []string{"-s", "-q",
		"-o", "Dir::State::status=" + status.Name(),
		"-o", "Debug::NoLocking=1",
		"-o", "APT::Install-Recommends=false",
		"-o", "APT::Install-Suggests=false",
		"install", "--"}
	args = append(args, names...)
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	all := stdout.String() + stderr.String()
	if m := unableRe.FindStringSubmatch(all); m != nil {
		name := m[1]
		if name == "" {
			name = m[2]
		}
		return nil, &NotFoundError{Name: name}
	}
	if runErr != nil {
		return nil, fmt.Errorf("resolving Debian packages %v with apt-get: %w: %s", names, runErr, tail(stderr.String(), 2000))
	}
	pkgs, err := ParseSimulate(stdout.String())
	if err != nil {
		return nil, fmt.Errorf("parsing apt-get simulation: %w", err)
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("apt-get selected no packages for %v: %s", names, tail(all, 2000))
	}
	return pkgs, nil
}

// ParseSimulate parses the "Inst name [old] (version release... [arch])"
// lines of `apt-get -s install` output.
func ParseSimulate(out string) ([]Package, error) {
	var pkgs []Package
	seen := map[string]bool{}
	for _, line := range strings.Split(out, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimRight(line, "\r"), "Inst ")
		if !ok {
			continue
		}
		name, rest, _ := strings.Cut(strings.TrimSpace(rest), " ")
		if name == "" {
			return nil, fmt.Errorf("malformed line %q: no package name", line)
		}
		rest = strings.TrimSpace(rest)
		if strings.HasPrefix(rest, "[") { // installed version being replaced
			i := strings.IndexByte(rest, ']')
			if i < 0 {
				return nil, fmt.Errorf("malformed line %q: unterminated old version", line)
			}
			rest = strings.TrimSpace(rest[i+1:])
		}
		if !strings.HasPrefix(rest, "(") {
			return nil, fmt.Errorf("malformed line %q: no version", line)
		}
		end := strings.IndexByte(rest, ')')
		if end < 0 {
			return nil, fmt.Errorf("malformed line %q: unterminated version", line)
		}
		fields := strings.Fields(rest[1:end])
		if len(fields) < 2 {
			return nil, fmt.Errorf("malformed line %q: no architecture", line)
		}
		version := fields[0]
		last := fields[len(fields)-1]
		if !strings.HasPrefix(last, "[") || !strings.HasSuffix(last, "]") || len(last) < 3 {
			return nil, fmt.Errorf("malformed line %q: no architecture", line)
		}
		arch := last[1 : len(last)-1]
		if n, a, ok := strings.Cut(name, ":"); ok {
			name = n
			if a != arch && arch == "all" {
				arch = a
			}
		}
		if !validName(name) || !validVersion(version) || !validName(arch) {
			return nil, fmt.Errorf("malformed line %q", line)
		}
		if seen[name+":"+arch] {
			continue
		}
		seen[name+":"+arch] = true
		pkgs = append(pkgs, Package{Name: name, Version: version, Arch: arch})
	}
	return pkgs, nil
}

func validName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '-' || c == '.' || c >= 'A' && c <= 'Z' || c == '_') {
			return false
		}
	}
	return true
}

func validVersion(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("+-.:~", c)) {
			return false
		}
	}
	return true
}

// debName is the file name apt-get download gives a package.
func debName(p Package) string {
	return fmt.Sprintf("%s_%s_%s.deb", p.Name, strings.ReplaceAll(p.Version, ":", "%3a"), p.Arch)
}

// Download fetches the .deb files of pkgs into the cache (<cache>/debian/debs)
// unless already there, and sets each package's Deb path.
func Download(ctx context.Context, pkgs []Package, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	debs, err := cache.Sub("debian/debs")
	if err != nil {
		return err
	}
	var missing []int
	for i := range pkgs {
		p := filepath.Join(debs, debName(pkgs[i]))
		if _, err := os.Stat(p); err == nil {
			pkgs[i].Deb = p
			continue
		}
		missing = append(missing, i)
	}
	if len(missing) == 0 {
		return nil
	}
	tmp, err := os.MkdirTemp(debs, ".download-*")
	if err != nil {
		return fmt.Errorf("creating download directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"-q", "-o", "Debug::NoLocking=1"}
	if os.Geteuid() == 0 {
		args = append(args, "-o", "APT::Sandbox::User=root")
	}
	args = append(args, "download", "--")
	for _, i := range missing {
		p := pkgs[i]
		spec := p.Name
		if p.Arch != "all" {
			spec += ":" + p.Arch
		}
		args = append(args, spec+"="+p.Version)
	}
	log.Info("downloading Debian packages", "count", len(missing))
	cmd := exec.CommandContext(ctx, "apt-get", args...)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("downloading Debian packages with apt-get (check the network and run apt-get update): %w: %s", err, tail(out.String(), 2000))
	}
	for _, i := range missing {
		name := debName(pkgs[i])
		src := filepath.Join(tmp, name)
		if _, err := os.Stat(src); err != nil {
			return fmt.Errorf("apt-get download did not produce %s: %w", name, err)
		}
		dst := filepath.Join(debs, name)
		if err := os.Rename(src, dst); err != nil {
			return fmt.Errorf("storing %s in the cache: %w", name, err)
		}
		pkgs[i].Deb = dst
	}
	return nil
}

// Extract unpacks each package's .deb into root with dpkg-deb -x.
func Extract(ctx context.Context, pkgs []Package, root string) error {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		return fmt.Errorf("dpkg-deb not found: install dpkg: %w", err)
	}
	for _, p := range pkgs {
		if p.Deb == "" {
			return fmt.Errorf("extracting %s: not downloaded", p.Name)
		}
		cmd := exec.CommandContext(ctx, "dpkg-deb", "-x", p.Deb, root)
		if out, err := cmd.CombinedOutput(); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("extracting %s: %w: %s", filepath.Base(p.Deb), err, tail(string(out), 1000))
		}
	}
	return nil
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}
