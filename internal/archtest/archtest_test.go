package archtest

import (
	"bytes"
	"encoding/json"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/kiln-dev/kiln/internal/testutil"
)

type pkg struct {
	ImportPath string
	Name       string
	Doc        string
	Deps       []string
}

// list runs `go list -json` on patterns from the repository's top.
func list(t *testing.T, args ...string) []pkg {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-json"}, args...)...)
	cmd.Dir = testutil.RepoRoot(t)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list %v: %v", args, err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	return pkgs
}

// TestPackageDocs fails for a package without a doc comment that starts
// "Package <name> " (or "Command <dir> " for a main package).
func TestPackageDocs(t *testing.T) {
	for _, p := range list(t, "./...") {
		want := "Package " + p.Name + " "
		if p.Name == "main" {
			want = "Command " + p.ImportPath[strings.LastIndexByte(p.ImportPath, '/')+1:] + " "
		}
		if !strings.HasPrefix(p.Doc, want) {
			t.Errorf("package %s: doc comment %q, want one sentence starting %q", p.ImportPath, p.Doc, want)
		}
	}
}

// TestInitDependencies holds kiln-init, the guest's PID 1, to a small
// dependency budget: the standard library, golang.org/x/sys and kiln's guest
// packages. Nothing of the host CLI's weight (cobra, SQLite, Prometheus,
// plotting, FUSE) may reach PID 1.
func TestInitDependencies(t *testing.T) {
	forbidden := []string{
		"github.com/spf13/", "modernc.org/", "github.com/prometheus/", "gonum.org/",
		"github.com/hanwen/go-fuse", "github.com/pelletier/go-toml",
	}
	allowedKiln := []string{"github.com/kiln-dev/kiln/internal/guest/", "github.com/kiln-dev/kiln/cmd/kiln-init"}
	pkgs := list(t, "-deps", "./cmd/kiln-init")
	if len(pkgs) == 0 {
		t.Fatal("go list -deps ./cmd/kiln-init listed nothing")
	}
	for _, p := range pkgs {
		ip := p.ImportPath
		for _, f := range forbidden {
			if strings.HasPrefix(ip, f) {
				t.Errorf("kiln-init depends on %s: keep %s out of PID 1", ip, f)
			}
		}
		if strings.HasPrefix(ip, "github.com/kiln-dev/kiln/") {
			ok := false
			for _, a := range allowedKiln {
				ok = ok || strings.HasPrefix(ip, a)
			}
			if !ok {
				t.Errorf("kiln-init depends on %s: PID 1 may use only kiln's guest packages (internal/guest/...)", ip)
			}
		}
		if strings.Contains(ip, ".") && !strings.HasPrefix(ip, "github.com/kiln-dev/kiln/") && !strings.HasPrefix(ip, "golang.org/x/sys/") && !strings.HasPrefix(ip, "vendor/") {
			t.Errorf("kiln-init depends on %s: outside its budget (standard library, golang.org/x/sys, internal/guest)", ip)
		}
	}
}
