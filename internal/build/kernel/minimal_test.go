package kernel

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
)

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string]string
		wantErr bool
	}{
		{name: "empty", in: "", want: map[string]string{}},
		{
			name: "fragment",
			in:   "# why\nCONFIG_A=y\n\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=64\n",
			want: map[string]string{"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": `"x y"`, "CONFIG_D": "64"},
		},
		{name: "comment that mentions an option", in: "# CONFIG_A stays on\n", want: map[string]string{}},
		{name: "duplicate", in: "CONFIG_A=y\n# CONFIG_A is not set\n", wantErr: true},
		{name: "not an option", in: "A=y\n", wantErr: true},
		{name: "missing value prefix", in: "CONFIG_A\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseConfig(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseConfig(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if err == nil {
				if diff := cmp.Diff(tt.want, got); diff != "" {
					t.Errorf("ParseConfig(%q) mismatch (-want +got):\n%s", tt.in, diff)
				}
			}
		})
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add(string(Fragment))
	f.Add("CONFIG_A=y\n# CONFIG_B is not set\n")
	f.Add("CONFIG_A=y\nCONFIG_A=n\n")
	f.Add("garbage")
	f.Fuzz(func(t *testing.T, in string) {
		got, err := ParseConfig(strings.NewReader(in))
		if err != nil {
			return
		}
		for k, v := range got {
			if !strings.HasPrefix(k, "CONFIG_") || strings.ContainsAny(k, " =\n") || strings.Contains(v, "\n") {
				t.Fatalf("ParseConfig(%q) gave %q=%q", in, k, v)
			}
		}
	})
}

// TestFragment checks that kiln.config parses and that every option in it
// says why it is there (a comment above it or above its group).
func TestFragment(t *testing.T) {
	opts, err := ParseConfig(bytes.NewReader(Fragment))
	if err != nil {
		t.Fatalf("ParseConfig(kiln.config) error = %v", err)
	}
	if len(opts) < 40 {
		t.Errorf("kiln.config has %d options, want the whole kernel kiln needs", len(opts))
	}
	for _, o := range []string{"CONFIG_PVH", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_CONSOLE", "CONFIG_EROFS_FS_ZIP", "CONFIG_NET_9P_VIRTIO", "CONFIG_9P_FS", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_KVM_GUEST", "CONFIG_MAGIC_SYSRQ", "CONFIG_VM_EVENT_COUNTERS"} {
		if opts[o] != "y" {
			t.Errorf("kiln.config: %s = %q, want y", o, opts[o])
		}
	}
	if v, ok := opts["CONFIG_MODULES"]; ok && v != "n" {
		t.Errorf("kiln.config: CONFIG_MODULES = %q, want off (kiln's kernel has everything built in)", v)
	}
	if opts["CONFIG_IPV6"] != "n" {
		t.Errorf("kiln.config: CONFIG_IPV6 = %q, want n", opts["CONFIG_IPV6"])
	}
}

func TestCheckConfig(t *testing.T) {
	want := map[string]string{"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y", "CONFIG_D": "n"}
	if err := CheckConfig(want, map[string]string{"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "y"}); err != nil {
		t.Errorf("CheckConfig(all as asked) = %v, want nil", err)
	}
	err := CheckConfig(want, map[string]string{"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_D": "n"})
	if err == nil {
		t.Fatal("CheckConfig(B on, C dropped) = nil, want an error")
	}
	for _, s := range []string{"CONFIG_B=n (merged: y)", "CONFIG_C=y (merged: unset)"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("CheckConfig error = %q, want it to name %q", err, s)
		}
	}
}

func TestParseSum(t *testing.T) {
	h := strings.Repeat("ab", 32)
	tests := []struct {
		name    string
		in      string
		want    Sum
		wantErr bool
	}{
		{
			name: "ok",
			in:   "# c\nfragment " + h + "\nsource linux-source-6.1 6.1.192-3\n\nvmlinux " + h + "\n",
			want: Sum{Fragment: h, SourcePackage: "linux-source-6.1", SourceVersion: "6.1.192-3", Vmlinux: h},
		},
		{name: "missing vmlinux", in: "fragment " + h + "\nsource linux-source-6.1 6.1.192-3\n", wantErr: true},
		{name: "bad hex", in: "fragment xyz\nsource a-b 1\nvmlinux " + h + "\n", wantErr: true},
		{name: "twice", in: "fragment " + h + "\nfragment " + h + "\n", wantErr: true},
		{name: "unknown", in: "kernel " + h + "\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseSum(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseSum(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if err == nil && got != tt.want {
				t.Errorf("ParseSum(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func FuzzParseSum(f *testing.F) {
	f.Add(string(SumFile))
	f.Add("fragment 00\n")
	f.Add("source a b c\n")
	f.Fuzz(func(t *testing.T, in string) {
		s, err := ParseSum(strings.NewReader(in))
		if err != nil {
			return
		}
		if !hexRE.MatchString(s.Fragment) || !hexRE.MatchString(s.Vmlinux) || s.SourcePackage == "" {
			t.Fatalf("ParseSum(%q) = %+v without an error", in, s)
		}
	})
}

// TestFragmentSum: kiln.sum records the digest of this kiln.config, so a
// changed fragment cannot keep an old kernel digest.
func TestFragmentSum(t *testing.T) {
	s, err := ParseSum(bytes.NewReader(SumFile))
	if err != nil {
		t.Fatalf("ParseSum(kiln.sum) error = %v", err)
	}
	if got := FragmentDigest(); s.Fragment != got {
		t.Errorf("kiln.sum fragment = %s, want %s (kiln.config changed: run `kiln kernel build --json` and record fragment_sha256, source_version and vmlinux_sha256 in kiln.sum)", s.Fragment, got)
	}
	if s.SourcePackage != SourcePackage {
		t.Errorf("kiln.sum source package = %q, want %q", s.SourcePackage, SourcePackage)
	}
}

// TestMinimalDigest builds kiln's kernel (or takes it from the cache, where
// CI's scripts/test.sh has just built it from scratch) and compares its
// vmlinux with the digest recorded in kiln.sum: the same fragment and
// source give the same bytes.
func TestMinimalDigest(t *testing.T) {
	testutil.NeedNetwork(t)
	for _, tool := range BuildTools {
		testutil.NeedTool(t, tool[0], tool[1])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	k, err := Minimal(ctx, BuildOptions{Log: slog.New(slog.NewTextHandler(tWriter{t}, nil))})
	if err != nil {
		t.Fatalf("Minimal() error = %v", err)
	}
	s, err := ParseSum(bytes.NewReader(SumFile))
	if err != nil {
		t.Fatal(err)
	}
	got, err := FileDigest(k.Vmlinuz)
	if err != nil {
		t.Fatal(err)
	}
	if got != k.Build.VmlinuxSHA256 {
		t.Errorf("vmlinux sha256 = %s, kernel.json says %s: the cached kernel changed after its build", got, k.Build.VmlinuxSHA256)
	}
	if k.PackageVersion != s.SourceVersion {
		t.Skipf("apt offers %s %s, kiln.sum records a build of %s: the recorded digest is for another source (record the new one: kiln kernel build --json)", SourcePackage, k.PackageVersion, s.SourceVersion)
	}
	if got != s.Vmlinux {
		t.Errorf("vmlinux of %s %s with kiln.config: sha256 %s, want %s as kiln.sum records: the build is not reproducible (or kiln.sum is stale)", SourcePackage, k.PackageVersion, got, s.Vmlinux)
	}
	if _, err := os.Stat(k.Config); err != nil {
		t.Errorf("the kernel's config: %v", err)
	}
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
