package debian

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
)

const simOut = `Reading package lists...
Building dependency tree...
NOTE: This is only a simulation!
Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
Conf gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])
Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []
Inst libssl3 [3.0.1-1] (3.0.22-1~deb12u2 Debian-Security:12/oldstable-security [amd64])
Inst python3-numpy (1:1.24.2-1+deb12u1 Debian:12.15/oldstable, Debian:12/stable-updates [amd64])
Inst media-types (10.0.0 Debian:12.15/oldstable [all])
Inst libfoo:i386 (1.0 Debian:12 [i386])
Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])
`

func TestParseSimulate(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []Package
		wantErr bool
	}{
		{"real", simOut, []Package{
			{Name: "gcc-12-base", Version: "12.2.0-14+deb12u1", Arch: "amd64"},
			{Name: "libc6", Version: "2.36-9+deb12u14", Arch: "amd64"},
			{Name: "libssl3", Version: "3.0.22-1~deb12u2", Arch: "amd64"},
			{Name: "python3-numpy", Version: "1:1.24.2-1+deb12u1", Arch: "amd64"},
			{Name: "media-types", Version: "10.0.0", Arch: "all"},
			{Name: "libfoo", Version: "1.0", Arch: "i386"},
		}, false},
		{"empty", "", nil, false},
		{"no inst lines", "0 upgraded, 0 newly installed\n", nil, false},
		{"duplicate", "Inst a (1 x [amd64])\nInst a (1 x [amd64])\n", []Package{{Name: "a", Version: "1", Arch: "amd64"}}, false},
		{"no version", "Inst a\n", nil, true},
		{"unterminated", "Inst a (1 x [amd64]\n", nil, true},
		{"no arch", "Inst a (1)\n", nil, true},
		{"bad arch", "Inst a (1 x amd64)\n", nil, true},
		{"bad old", "Inst a [1 (1 x [amd64])\n", nil, true},
		{"bad name", "Inst a/b (1 x [amd64])\n", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSimulate(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseSimulate(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseSimulate(%q) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func FuzzParseSimulate(f *testing.F) {
	f.Add(simOut)
	f.Add("Inst a (1 x [amd64])")
	f.Add("Inst a [0] (1 x [all]) []")
	f.Add("Inst (")
	f.Add("Inst a:amd64 (1:2~3 r [amd64])\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		pkgs, err := ParseSimulate(s)
		if err != nil {
			return
		}
		for _, p := range pkgs {
			if p.Name == "" || p.Version == "" || p.Arch == "" {
				t.Fatalf("ParseSimulate(%q) gave incomplete package %+v", s, p)
			}
			if strings.ContainsAny(p.Name+p.Version+p.Arch, " /()[]") {
				t.Fatalf("ParseSimulate(%q) gave unsafe package %+v", s, p)
			}
		}
	})
}

func TestResolveNotFound(t *testing.T) {
	_, err := Resolve(context.Background(), []string{"kiln-no-such-package-xyz"})
	var nf *NotFoundError
	if !errors.As(err, &nf) || nf.Name != "kiln-no-such-package-xyz" {
		t.Fatalf("Resolve(bogus) error = %v, want NotFoundError", err)
	}
	want := `Debian package "kiln-no-such-package-xyz" not found: check the name (apt-cache search kiln-no-such-package-xyz) and run apt-get update`
	if err.Error() != want {
		t.Errorf("Resolve(bogus) error = %q, want %q", err, want)
	}
}

func TestResolveDownloadExtract(t *testing.T) {
	testutil.NeedNetwork(t)
	ctx := context.Background()
	pkgs, err := Resolve(ctx, []string{"python3-numpy"})
	if err != nil {
		t.Fatalf("Resolve(python3-numpy): %v", err)
	}
	names := map[string]Package{}
	for _, p := range pkgs {
		names[p.Name] = p
	}
	for _, want := range []string{"python3-numpy", "libblas3", "liblapack3", "libc6"} {
		if _, ok := names[want]; !ok {
			t.Errorf("Resolve(python3-numpy) lacks %s: %v", want, pkgs)
		}
	}
	// Download and extract a small subset to keep the test quick.
	sub := []Package{names["libblas3"]}
	if err := Download(ctx, sub, nil); err != nil {
		t.Fatalf("Download(libblas3): %v", err)
	}
	if sub[0].Deb == "" || !strings.HasSuffix(sub[0].Deb, ".deb") {
		t.Fatalf("Download set Deb = %q, want a .deb path", sub[0].Deb)
	}
	again := []Package{{Name: sub[0].Name, Version: sub[0].Version, Arch: sub[0].Arch}}
	if err := Download(ctx, again, nil); err != nil || again[0].Deb != sub[0].Deb {
		t.Fatalf("second Download = %q, %v; want cached %q", again[0].Deb, err, sub[0].Deb)
	}
	root := t.TempDir()
	if err := Extract(ctx, sub, root); err != nil {
		t.Fatalf("Extract: %v", err)
	}
	m, _ := filepath.Glob(filepath.Join(root, "usr/lib/x86_64-linux-gnu/blas/libblas.so.3*"))
	if len(m) == 0 {
		t.Errorf("Extract(libblas3) produced no usr/lib/x86_64-linux-gnu/blas/libblas.so.3")
	}
}

func TestParseControl(t *testing.T) {
	const stanza = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-1\nArchitecture: amd64\nDepends: linux-image-6.1.0-42-cloud-amd64 (= 6.1.192-1)\nDescription: Linux for x86-64 cloud (meta-package)\n This package depends on the latest Linux kernel\n and modules.\n\nPackage: second-stanza\n"
	h, err := ParseControl([]byte(stanza))
	if err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{
		"Package":     "linux-image-cloud-amd64",
		"Version":     "6.1.192-1",
		"Depends":     "linux-image-6.1.0-42-cloud-amd64 (= 6.1.192-1)",
		"Description": "Linux for x86-64 cloud (meta-package) This package depends on the latest Linux kernel and modules.",
	} {
		if got := h.Get(k); got != want {
			t.Errorf("ParseControl(stanza).Get(%q) = %q, want %q", k, got, want)
		}
	}
	if _, err := ParseControl([]byte(" leading continuation\n")); err == nil {
		t.Errorf("ParseControl(leading continuation line) succeeded, want an error")
	}
	if h, err := ParseControl(nil); err != nil || len(h) != 0 {
		t.Errorf("ParseControl(empty) = %v, %v; want an empty header", h, err)
	}
}

func FuzzParseControl(f *testing.F) {
	f.Add("Package: a\nVersion: 1\n\nPackage: b\n")
	f.Add("Description: x\n continued\n")
	f.Add(":\n")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseControl([]byte(s))
		if err != nil && h != nil {
			t.Fatalf("ParseControl(%q) returned a header with error %v", s, err)
		}
	})
}
