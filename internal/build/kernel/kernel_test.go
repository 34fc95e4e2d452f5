package kernel

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kiln-dev/kiln/internal/testutil"
)

func TestParseModulesDep(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string][]string
		wantErr bool
	}{
		{name: "empty", in: "", want: map[string][]string{}},
		{
			name: "debian",
			in: "kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\n" +
				"kernel/lib/libcrc32c.ko:\n" +
				"kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n",
			want: map[string][]string{
				"kernel/fs/erofs/erofs.ko":            {"kernel/lib/libcrc32c.ko"},
				"kernel/lib/libcrc32c.ko":             {},
				"kernel/drivers/virtio/virtio_pci.ko": {"kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"},
			},
		},
		{name: "blank lines and comments", in: "\n# c\na.ko:  b.ko\t c.ko \n\n", want: map[string][]string{"a.ko": {"b.ko", "c.ko"}}},
		{name: "compressed", in: "a.ko.xz: b.ko.zst\n", want: map[string][]string{"a.ko.xz": {"b.ko.zst"}}},
		{name: "no colon", in: "a.ko b.ko\n", wantErr: true},
		{name: "empty name", in: ": b.ko\n", wantErr: true},
		{name: "duplicate", in: "a.ko:\na.ko: b.ko\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseModulesDep(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("ParseModulesDep(%q) error = %v, wantErr %v", tt.in, err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseModulesDep(%q) mismatch (-want +got):\n%s", tt.in, diff)
			}
		})
	}
}

func FuzzParseModulesDep(f *testing.F) {
	f.Add("kernel/fs/erofs/erofs.ko: kernel/lib/libcrc32c.ko\nkernel/lib/libcrc32c.ko:\n")
	f.Add("a.ko b.ko\n")
	f.Add("\n# comment\n:x\n")
	f.Add("a.ko.xz: b.ko.zst c.ko\n")
	f.Fuzz(func(t *testing.T, in string) {
		deps, err := ParseModulesDep(strings.NewReader(in))
		if err != nil {
			return
		}
		for mod, ds := range deps {
			if mod == "" || strings.ContainsAny(mod, " \t\n") {
				t.Errorf("ParseModulesDep(%q): bad module name %q", in, mod)
			}
			for _, d := range ds {
				if d == "" || strings.ContainsAny(d, " \t\n") {
					t.Errorf("ParseModulesDep(%q): module %q has bad dependency %q", in, mod, d)
				}
			}
		}
		// Closure over whatever parsed must terminate (cycles are errors).
		names := make([]string, 0, len(deps))
		for m := range deps {
			names = append(names, ModuleName(m))
		}
		_, _ = closure(deps, nil, "/m", names)
	})
}

func TestParseModinfo(t *testing.T) {
	tests := []struct {
		in       string
		wantName string
		wantDeps []string
	}{
		{"license=GPL\x00depends=virtio_ring,virtio\x00retpoline=Y\x00name=virtio_pci\x00vermagic=6.1.0\x00", "virtio_pci", []string{"virtio_ring", "virtio"}},
		{"name=erofs\x00depends=libcrc32c\x00", "erofs", []string{"libcrc32c"}},
		{"depends=\x00name=virtio\x00", "virtio", nil},
		{"name=a-b\x00depends=c-d, e\x00", "a-b", []string{"c_d", "e"}},
		{"garbage", "", nil},
	}
	for _, tt := range tests {
		name, deps := ParseModinfo([]byte(tt.in))
		if name != tt.wantName || !cmp.Equal(deps, tt.wantDeps) {
			t.Errorf("ParseModinfo(%q) = %q, %q; want %q, %q", tt.in, name, deps, tt.wantName, tt.wantDeps)
		}
	}
}

func FuzzParseModinfo(f *testing.F) {
	f.Add([]byte("name=erofs\x00depends=libcrc32c\x00"))
	f.Add([]byte("depends=,,a\x00=\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, deps := ParseModinfo(b)
		for _, d := range deps {
			if d == "" || strings.Contains(d, ",") {
				t.Errorf("ParseModinfo(%q): bad dependency %q", b, d)
			}
		}
	})
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/fs/erofs/erofs.ko":                   "erofs",
		"kernel/net/vmw_vsock/vsock.ko.xz":           "vsock",
		"kernel/drivers/char/virtio-console.ko.zst":  "virtio_console",
		"kernel/drivers/virtio/virtio_pci_modern.ko": "virtio_pci_modern",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestClosure(t *testing.T) {
	deps := map[string][]string{
		"k/virtio_pci.ko":  {"k/virtio_ring.ko", "k/virtio.ko"},
		"k/virtio_blk.ko":  {"k/virtio_ring.ko", "k/virtio.ko"},
		"k/virtio_ring.ko": {"k/virtio.ko"},
		"k/virtio.ko":      {},
		"k/erofs.ko":       {"k/libcrc32c.ko"},
		"k/libcrc32c.ko":   {},
		"k/cyc_a.ko":       {"k/cyc_b.ko"},
		"k/cyc_b.ko":       {"k/cyc_a.ko"},
		"k/xz_mod.ko.xz":   {},
		"k/missing_dep.ko": {"k/nowhere.ko"},
	}
	builtin := map[string]bool{"ext4": true}
	tests := []struct {
		names   []string
		want    []string
		wantErr string
	}{
		{names: []string{"virtio_pci", "virtio_blk"}, want: []string{"virtio", "virtio_ring", "virtio_pci", "virtio_blk"}},
		{names: []string{"erofs", "ext4", "virtio-pci"}, want: []string{"libcrc32c", "erofs", "virtio", "virtio_ring", "virtio_pci"}},
		{names: []string{"virtio_ring", "virtio_ring"}, want: []string{"virtio", "virtio_ring"}},
		{names: []string{"nosuch"}, wantErr: `unknown kernel module "nosuch"`},
		{names: []string{"cyc_a"}, wantErr: "cycle"},
		{names: []string{"xz_mod"}, wantErr: "compressed"},
		{names: []string{"missing_dep"}, wantErr: "nowhere.ko"},
	}
	for _, tt := range tests {
		got, err := closure(deps, builtin, "/mods", tt.names)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("closure(%q) error = %v, want containing %q", tt.names, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("closure(%q) error = %v", tt.names, err)
			continue
		}
		var names []string
		for _, m := range got {
			names = append(names, m.Name)
			if want := "/mods/k/" + m.Name + ".ko"; m.Path != want {
				t.Errorf("closure(%q): %s path = %q, want %q", tt.names, m.Name, m.Path, want)
			}
		}
		if diff := cmp.Diff(tt.want, names); diff != "" {
			t.Errorf("closure(%q) mismatch (-want +got):\n%s", tt.names, diff)
		}
	}
}

func TestCompareVersions(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"6.1.192-2", "6.1.192-2", 0},
		{"6.1.192-2", "6.1.99-1", 1},
		{"6.1.99-1", "6.1.192-2", -1},
		{"6.1.192-2", "6.1.192-10", -1},
		{"1:1.0", "2.0", 1},
		{"1.0~rc1", "1.0", -1},
		{"1.0", "1.0+deb12u1", -1},
		{"1.0a", "1.0", 1},
		{"001.0", "1.0", 0},
		{"6.1.158-1", "6.1.158-1~bpo11+1", 1},
	}
	for _, tt := range tests {
		if got := CompareVersions(tt.a, tt.b); got != tt.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
}

func TestNewestCached(t *testing.T) {
	dir := t.TempDir()
	mk := func(pkg, ver string) {
		rel := strings.TrimPrefix(pkg, "linux-image-")
		root := filepath.Join(dir, entryName(pkg, ver))
		for _, p := range []string{filepath.Join(root, "boot", "vmlinuz-"+rel), filepath.Join(root, "lib", "modules", rel, "modules.dep")} {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk("linux-image-6.1.0-9-cloud-amd64", "6.1.27-1")
	mk("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")
	mk("linux-image-6.1.0-40-cloud-amd64", "6.1.153-1")
	// Incomplete entries and temp dirs are ignored.
	if err := os.MkdirAll(filepath.Join(dir, entryName("linux-image-6.1.0-99-cloud-amd64", "6.1.999-1")), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, ".fetch-123"), 0o755); err != nil {
		t.Fatal(err)
	}
	k, err := newestCached(dir)
	if err != nil {
		t.Fatalf("newestCached: %v", err)
	}
	if k.Package != "linux-image-6.1.0-56-cloud-amd64" || k.PackageVersion != "6.1.192-2" || k.Version != "6.1.0-56-cloud-amd64" {
		t.Errorf("newestCached = %+v, want linux-image-6.1.0-56-cloud-amd64 6.1.192-2", k)
	}
	if _, err := newestCached(t.TempDir()); err == nil {
		t.Errorf("newestCached(empty dir) succeeded, want error")
	}
}

func TestLocal(t *testing.T) {
	dir := t.TempDir()
	mods := filepath.Join(dir, "lib", "modules", "6.9.0-test")
	if err := os.MkdirAll(mods, 0o755); err != nil {
		t.Fatal(err)
	}
	vm := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(vm, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Local(vm, vm); err == nil {
		t.Errorf("Local(%q, %q) with a file as modules dir succeeded, want error", vm, vm)
	}
	if err := os.WriteFile(filepath.Join(mods, "modules.dep"), []byte("kernel/a.ko:\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	k, err := Local(vm, mods)
	if err != nil {
		t.Fatalf("Local: %v", err)
	}
	if k.Version != "6.9.0-test" || k.Vmlinuz != vm || k.ModulesDir != mods {
		t.Errorf("Local(%q, %q) = %+v", vm, mods, k)
	}
	if _, err := Local(filepath.Join(dir, "nope"), mods); err == nil {
		t.Errorf("Local(missing vmlinuz) succeeded, want error")
	}
}

// TestFetch downloads Debian's cloud kernel (once per cache) and resolves the
// default module set against the real modules.dep.
func TestFetch(t *testing.T) {
	testutil.NeedNetwork(t) // a ~27 MB kernel package
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	k, err := Fetch(ctx, nil)
	if err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	if !strings.HasSuffix(k.Version, "-cloud-amd64") || k.Package != "linux-image-"+k.Version || k.PackageVersion == "" {
		t.Errorf("Fetch = %+v, want a linux-image-*-cloud-amd64 package", k)
	}
	if fi, err := os.Stat(k.Vmlinuz); err != nil || fi.Size() < 1<<20 {
		t.Errorf("Fetch: vmlinuz %s: size %v, err %v; want a >1 MiB bzImage", k.Vmlinuz, fi, err)
	}
	// A second Fetch reuses the cache and returns the same kernel.
	k2, err := Fetch(ctx, nil)
	if err != nil {
		t.Fatalf("second Fetch: %v", err)
	}
	if diff := cmp.Diff(k, k2); diff != "" {
		t.Errorf("second Fetch differs (-first +second):\n%s", diff)
	}

	mods, err := k.ModuleClosure(DefaultModules)
	if err != nil {
		t.Fatalf("ModuleClosure(%q): %v", DefaultModules, err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		if _, dup := pos[m.Name]; dup {
			t.Errorf("ModuleClosure: %s listed twice", m.Name)
		}
		pos[m.Name] = i
		if !strings.HasSuffix(m.Path, ".ko") {
			t.Errorf("ModuleClosure: %s path %s is not a plain .ko", m.Name, m.Path)
		}
		if _, err := os.Stat(m.Path); err != nil {
			t.Errorf("ModuleClosure: %s: %v", m.Name, err)
		}
	}
	for _, name := range DefaultModules {
		if _, ok := pos[name]; !ok {
			t.Errorf("ModuleClosure(%q) lacks %s: %v", DefaultModules, name, mods)
		}
	}
	// Every module comes after all of its dependencies.
	f, err := os.Open(filepath.Join(k.ModulesDir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	deps, err := ParseModulesDep(f)
	if err != nil {
		t.Fatalf("ParseModulesDep(real modules.dep): %v", err)
	}
	for _, m := range mods {
		rel, err := filepath.Rel(k.ModulesDir, m.Path)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range deps[rel] {
			dn := ModuleName(d)
			if p, ok := pos[dn]; !ok || p > pos[m.Name] {
				t.Errorf("ModuleClosure: %s (at %d) needs %s (at %d, present %v)", m.Name, pos[m.Name], dn, p, ok)
			}
		}
	}
	for _, pair := range [][2]string{{"virtio_ring", "virtio"}, {"virtio", "virtio_pci"}, {"libcrc32c", "erofs"}, {"vsock", "vmw_vsock_virtio_transport"}} {
		if a, b := pos[pair[0]], pos[pair[1]]; a >= b {
			t.Errorf("ModuleClosure: %s at %d, want before %s at %d", pair[0], a, pair[1], b)
		}
	}
	t.Logf("kernel %s (%s %s): %d modules", k.Version, k.Package, k.PackageVersion, len(mods))
}
