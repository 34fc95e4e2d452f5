// Package kernel provides guest kernels: it builds kiln's own module-less kernel from a config fragment, fetches Debian's cloud kernel, and resolves module closures.
package kernel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/kiln-dev/kiln/internal/build/debian"
	"github.com/kiln-dev/kiln/internal/cache"
)

// MetaPackage is the Debian metapackage that names the current cloud kernel.
const MetaPackage = "linux-image-cloud-amd64"

// DefaultModules are the modules kiln-init loads: virtio PCI transport, the
// root block device, virtio-serial ports, the erofs root filesystem (squashfs
// for comparisons) and vsock.
var DefaultModules = []string{"virtio_pci", "virtio_blk", "virtio_console", "erofs", "squashfs", "vmw_vsock_virtio_transport"}

// Kernel is a kernel image with its module tree (if it has modules) on
// the host.
type Kernel struct {
	Kind           string     // KindMinimal, KindDebian or KindLocal
	Version        string     // uname -r, e.g. "6.1.0-56-cloud-amd64"
	Package        string     // Debian package it came from, e.g. "linux-image-6.1.0-56-cloud-amd64" or "linux-source-6.1"; empty for Local
	PackageVersion string     // that package's version, e.g. "6.1.192-2"; empty for Local
	Vmlinuz        string     // path of the kernel image: a bzImage, or kiln's vmlinux (booted through its PVH entry)
	ModulesDir     string     // .../lib/modules/<Version>; "" for a kernel without modules
	Config         string     // path of its .config, when known
	ConfigDigest   string     // sha256 hex of Config, when known
	Build          *BuildInfo // how kiln built it (KindMinimal)
}

// Module is one loadable kernel module file.
type Module struct {
	Name string // canonical name, underscores, e.g. "virtio_pci"
	Path string // host path of the .ko file
}

// Local describes a user-supplied kernel (--kernel/--modules). The version
// is the base name of modulesDir.
func Local(vmlinuz, modulesDir string) (*Kernel, error) {
	if fi, err := os.Stat(vmlinuz); err != nil {
		return nil, fmt.Errorf("kernel image: %w", err)
	} else if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("kernel image %s is not a regular file", vmlinuz)
	}
	if fi, err := os.Stat(modulesDir); err != nil {
		return nil, fmt.Errorf("modules directory: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("modules directory %s is not a directory (pass the kernel's lib/modules/<version>)", modulesDir)
	}
	abs, err := filepath.Abs(modulesDir)
	if err != nil {
		return nil, fmt.Errorf("resolving modules directory: %w", err)
	}
	vm, err := filepath.Abs(vmlinuz)
	if err != nil {
		return nil, fmt.Errorf("resolving kernel image: %w", err)
	}
	return &Kernel{Kind: KindLocal, Version: filepath.Base(abs), Vmlinuz: vm, ModulesDir: abs}, nil
}

// Fetch returns Debian's current cloud kernel, downloading (apt-get download)
// and extracting (dpkg-deb -x) it into the cache on first use. Nothing is
// installed on the host. When apt cannot resolve or download the kernel but
// a kernel is already cached, the newest cached kernel is used.
func Fetch(ctx context.Context, log *slog.Logger) (*Kernel, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	dir, err := cache.Sub("kernel")
	if err != nil {
		return nil, err
	}
	pkg, rerr := resolve(ctx)
	if rerr == nil {
		if k, err := cached(dir, pkg.Name, pkg.Version); err == nil {
			log.Debug("using cached kernel", "package", pkg.Name, "version", pkg.Version)
			return k, nil
		}
		k, err := download(ctx, log, dir, pkg)
		if err == nil {
			return k, nil
		}
		rerr = err
	}
	k, err := newestCached(dir)
	if err != nil {
		return nil, fmt.Errorf("fetching kernel (install apt and dpkg, check network access, or pass --kernel and --modules): %w", rerr)
	}
	log.Warn("cannot fetch current kernel, using newest cached kernel", "package", k.Package, "version", k.PackageVersion, "err", rerr)
	return k, nil
}

// resolve finds the concrete kernel package the metapackage depends on and
// its candidate version.
func resolve(ctx context.Context) (debian.Package, error) {
	meta, err := debian.Show(ctx, MetaPackage)
	if err != nil {
		return debian.Package{}, err
	}
	var pkg debian.Package
	for _, dep := range strings.Split(meta.Get("Depends"), ",") {
		name, rel, _ := strings.Cut(strings.TrimSpace(dep), " ")
		if strings.HasPrefix(name, "linux-image-") && name != MetaPackage {
			pkg.Name = name
			// "(= 6.1.192-2)": the metapackage pins the exact version.
			if v, ok := strings.CutPrefix(strings.TrimSpace(rel), "(= "); ok {
				pkg.Version = strings.TrimSuffix(v, ")")
			}
			break
		}
	}
	if pkg.Name == "" {
		return debian.Package{}, fmt.Errorf("%s has no linux-image dependency (Depends: %q)", MetaPackage, meta.Get("Depends"))
	}
	h, err := debian.Show(ctx, pkg.Name)
	if err != nil {
		return debian.Package{}, err
	}
	if pkg.Version == "" {
		pkg.Version = h.Get("Version")
	}
	pkg.Arch = h.Get("Architecture")
	if pkg.Version == "" || pkg.Arch == "" {
		return debian.Package{}, fmt.Errorf("apt-cache show %s: no Version or Architecture field", pkg.Name)
	}
	return pkg, nil
}

// entryName is the cache directory name of a kernel package version.
func entryName(pkg, ver string) string {
	return pkg + "_" + strings.ReplaceAll(ver, ":", "%3a")
}

func parseEntryName(name string) (pkg, ver string, ok bool) {
	pkg, ver, ok = strings.Cut(name, "_")
	if !ok || !strings.HasPrefix(pkg, "linux-image-") || ver == "" {
		return "", "", false
	}
	return pkg, strings.ReplaceAll(ver, "%3a", ":"), true
}

// cached returns the kernel extracted at dir/entryName(pkg, ver), if complete.
func cached(dir, pkg, ver string) (*Kernel, error) {
	root := filepath.Join(dir, entryName(pkg, ver))
	release := strings.TrimPrefix(pkg, "linux-image-")
	k := &Kernel{
		Kind:           KindDebian,
		Version:        release,
		Package:        pkg,
		PackageVersion: ver,
		Vmlinuz:        filepath.Join(root, "boot", "vmlinuz-"+release),
		ModulesDir:     filepath.Join(root, "lib", "modules", release),
	}
	if _, err := os.Stat(k.Vmlinuz); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(k.ModulesDir, "modules.dep")); err != nil {
		return nil, err
	}
	if c := filepath.Join(root, "boot", "config-"+release); fileExists(c) {
		d, err := FileDigest(c)
		if err != nil {
			return nil, err
		}
		k.Config, k.ConfigDigest = c, d
	}
	return k, nil
}

// newestCached returns the cached kernel with the highest package version.
func newestCached(dir string) (*Kernel, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var best *Kernel
	for _, e := range ents {
		pkg, ver, ok := parseEntryName(e.Name())
		if !ok || !e.IsDir() {
			continue
		}
		k, err := cached(dir, pkg, ver)
		if err != nil {
			continue
		}
		if best == nil || CompareVersions(k.PackageVersion, best.PackageVersion) > 0 ||
			(CompareVersions(k.PackageVersion, best.PackageVersion) == 0 && k.Package > best.Package) {
			best = k
		}
	}
	if best == nil {
		return nil, fmt.Errorf("no kernel cached in %s", dir)
	}
	return best, nil
}

// download fetches (into the Debian package cache) and extracts pkg into
// dir atomically, through package debian like every other package.
func download(ctx context.Context, log *slog.Logger, dir string, pkg debian.Package) (*Kernel, error) {
	tmp, err := os.MkdirTemp(dir, ".fetch-")
	if err != nil {
		return nil, fmt.Errorf("creating kernel download directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	log.Info("downloading kernel", "package", pkg.Name, "version", pkg.Version)
	pkgs := []debian.Package{pkg}
	if err := debian.Download(ctx, pkgs, log); err != nil {
		return nil, fmt.Errorf("downloading kernel: %w", err)
	}
	root := filepath.Join(tmp, "root")
	if err := debian.Extract(ctx, pkgs, root); err != nil {
		return nil, fmt.Errorf("extracting kernel: %w", err)
	}
	// Keep only what kiln needs: the bzImage and the module tree.
	if err := pruneExtracted(root); err != nil {
		return nil, fmt.Errorf("extracting kernel: %w", err)
	}
	release := strings.TrimPrefix(pkg.Name, "linux-image-")
	if _, err := os.Stat(filepath.Join(root, "boot", "vmlinuz-"+release)); err != nil {
		return nil, fmt.Errorf("kernel package %s has no boot/vmlinuz-%s: %w", pkg.Name, release, err)
	}
	// Debian generates modules.dep in the package's postinst (depmod), so
	// the .deb has none: derive it from the modules' .modinfo sections.
	modDir := filepath.Join(root, "lib", "modules", release)
	deps, err := DepsFromModinfo(modDir)
	if err != nil {
		return nil, fmt.Errorf("kernel package %s: %w", pkg.Name, err)
	}
	if err := writeModulesDep(filepath.Join(modDir, "modules.dep"), deps); err != nil {
		return nil, fmt.Errorf("kernel package %s: %w", pkg.Name, err)
	}
	final := filepath.Join(dir, entryName(pkg.Name, pkg.Version))
	if err := os.Rename(root, final); err != nil {
		// Another process may have won the race; use its copy.
		if k, cerr := cached(dir, pkg.Name, pkg.Version); cerr == nil {
			return k, nil
		}
		return nil, fmt.Errorf("storing kernel in cache: %w", err)
	}
	return cached(dir, pkg.Name, pkg.Version)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// pruneExtracted removes documentation and other files kiln does not need.
func pruneExtracted(root string) error {
	for _, p := range []string{"usr/share", "etc"} {
		if err := os.RemoveAll(filepath.Join(root, p)); err != nil {
			return err
		}
	}
	return nil
}

// ParseModulesDep parses a depmod modules.dep file: lines of the form
// "path.ko: dep1.ko dep2.ko". It returns each module path mapped to its
// dependency paths in file order.
func ParseModulesDep(r io.Reader) (map[string][]string, error) {
	deps := map[string][]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		mod, rest, ok := strings.Cut(line, ":")
		mod = strings.TrimSpace(mod)
		if !ok || mod == "" || strings.ContainsAny(mod, " \t") {
			return nil, fmt.Errorf("modules.dep line %d: want \"module.ko: deps...\", got %q", n, line)
		}
		if _, dup := deps[mod]; dup {
			return nil, fmt.Errorf("modules.dep line %d: duplicate module %q", n, mod)
		}
		d := strings.Fields(rest)
		if d == nil {
			d = []string{}
		}
		deps[mod] = d
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading modules.dep: %w", err)
	}
	return deps, nil
}

// ModuleName returns the canonical module name of a module path:
// "kernel/fs/erofs/erofs.ko" => "erofs", "snd-hda.ko.xz" => "snd_hda".
func ModuleName(path string) string {
	base := filepath.Base(path)
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(base, ext) {
			base = strings.TrimSuffix(base, ext)
			break
		}
	}
	return strings.ReplaceAll(base, "-", "_")
}

// ModuleClosure returns the modules needed to load names, dependencies
// first. Modules built into the kernel (modules.builtin) are skipped.
// A kernel without modules (ModulesDir "") needs none.
func (k *Kernel) ModuleClosure(names []string) ([]Module, error) {
	if k.ModulesDir == "" {
		return nil, nil
	}
	deps, err := k.deps()
	if err != nil {
		return nil, err
	}
	builtin := map[string]bool{}
	if b, err := os.ReadFile(filepath.Join(k.ModulesDir, "modules.builtin")); err == nil {
		for _, l := range strings.Fields(string(b)) {
			builtin[ModuleName(l)] = true
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("reading built-in module list: %w", err)
	}
	return closure(deps, builtin, k.ModulesDir, names)
}

func closure(deps map[string][]string, builtin map[string]bool, modulesDir string, names []string) ([]Module, error) {
	byName := make(map[string]string, len(deps))
	for p := range deps {
		byName[ModuleName(p)] = p
	}
	var out []Module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(path string, chain []string) error
	visit = func(path string, chain []string) error {
		switch state[path] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("module dependency cycle: %s", strings.Join(append(chain, ModuleName(path)), " -> "))
		}
		state[path] = 1
		chain = append(chain, ModuleName(path))
		ds := deps[path]
		for _, d := range ds {
			if _, ok := deps[d]; !ok {
				return fmt.Errorf("module %s depends on %s, which modules.dep does not list", ModuleName(path), d)
			}
			if err := visit(d, chain); err != nil {
				return err
			}
		}
		state[path] = 2
		if strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".zst") || strings.HasSuffix(path, ".gz") {
			return fmt.Errorf("module %s is compressed (%s); kiln needs plain .ko modules (use a kernel with uncompressed modules)", ModuleName(path), filepath.Base(path))
		}
		p := path
		if !filepath.IsAbs(p) {
			p = filepath.Join(modulesDir, p)
		}
		out = append(out, Module{Name: ModuleName(path), Path: p})
		return nil
	}
	seen := map[string]bool{}
	for _, n := range names {
		name := ModuleName(n + ".ko")
		if seen[name] {
			continue
		}
		seen[name] = true
		p, ok := byName[name]
		if !ok {
			if builtin[name] {
				continue
			}
			known := make([]string, 0, 3)
			for m := range byName {
				if strings.Contains(m, name) || strings.Contains(name, m) {
					known = append(known, m)
				}
			}
			sort.Strings(known)
			hint := ""
			if len(known) > 0 && len(known) <= 5 {
				hint = fmt.Sprintf(" (similar: %s)", strings.Join(known, ", "))
			}
			return nil, fmt.Errorf("unknown kernel module %q: not in modules.dep or modules.builtin%s", n, hint)
		}
		if err := visit(p, nil); err != nil {
			return nil, err
		}
	}
	return out, nil
}
