package kernel

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	_ "embed"

	"golang.org/x/sys/unix"

	"github.com/kiln-dev/kiln/internal/build/debian"
	"github.com/kiln-dev/kiln/internal/cache"
)

// Kernel kinds, as kiln.toml's kernel key and the image manifest name them.
const (
	KindMinimal = "minimal" // kiln's kernel: kiln.config on Debian's linux-source
	KindDebian  = "debian"  // Debian's cloud kernel and its modules
	KindLocal   = "local"   // --kernel/--modules
)

// SourcePackage is the Debian package whose tarball kiln's kernel is
// built from (the release of Debian's cloud kernel).
const SourcePackage = "linux-source-6.1"

// Fragment is kiln's kernel config fragment (kiln.config), merged onto
// tinyconfig.
//
//go:embed kiln.config
var Fragment []byte

// SumFile is kiln.sum: the fragment's digest and the vmlinux it gave.
//
//go:embed kiln.sum
var SumFile []byte

// FragmentDigest is the sha256 (hex) of Fragment.
func FragmentDigest() string {
	h := sha256.Sum256(Fragment)
	return hex.EncodeToString(h[:])
}

// Reproducible-build settings of kbuild: the same fragment and source give
// the same vmlinux bytes on any machine with the same compiler.
var kbuildEnv = []string{
	"KBUILD_BUILD_TIMESTAMP=1970-01-01 00:00:00 UTC",
	"KBUILD_BUILD_USER=kiln",
	"KBUILD_BUILD_HOST=kiln",
	"KBUILD_BUILD_VERSION=1",
	"ARCH=x86_64",
	"LC_ALL=C",
	"TZ=UTC",
}

// BuildTools are the host programs a kernel build runs, with the Debian
// package of each (scripts/deps.sh installs them).
var BuildTools = [][2]string{
	{"make", "make"}, {"gcc", "gcc"}, {"flex", "flex"}, {"bison", "bison"},
	{"bc", "bc"}, {"tar", "tar"}, {"xz", "xz-utils"}, {"perl", "perl"}, {"objcopy", "binutils"},
}

// BuildInfo is kernel.json, written next to a built kernel.
type BuildInfo struct {
	Release        string  `json:"release"` // uname -r
	SourcePackage  string  `json:"source_package"`
	SourceVersion  string  `json:"source_version"`
	FragmentSHA256 string  `json:"fragment_sha256"`
	ConfigSHA256   string  `json:"config_sha256"` // the merged .config
	VmlinuxSHA256  string  `json:"vmlinux_sha256"`
	VmlinuxSize    int64   `json:"vmlinux_size"`
	BuildSeconds   float64 `json:"build_seconds"`
	Jobs           int     `json:"jobs"`
	Options        int     `json:"fragment_options"`
}

// BuildOptions tune Minimal.
type BuildOptions struct {
	Log *slog.Logger // nil discards
	// Progress, when set, is called when a step of a kernel build starts
	// (done false) and ends (done true); a cached kernel reports nothing.
	Progress func(step string, done bool, detail string)
	// Tick, when set, is called about every few seconds during the
	// compile step with how many files were compiled.
	Tick func(step, detail string)
	// Jobs is make's -j (0: the number of CPUs).
	Jobs int
	// Offline uses the newest cached build of the fragment without asking
	// apt for the source's version.
	Offline bool
}

// Minimal returns kiln's kernel built from Fragment on Debian's current
// SourcePackage, building it on first use (minutes; see BuildOptions
// Progress) into <cache>/kernel/minimal. Builds are serialized across
// processes by a lock; the source tree is built in a temporary directory
// that is removed afterwards, and only vmlinux, its .config and
// kernel.json are moved into place, atomically. When apt cannot say which
// source version is current, the newest cached build of the fragment is
// used.
func Minimal(ctx context.Context, o BuildOptions) (*Kernel, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	dir, err := cache.Sub("kernel/minimal")
	if err != nil {
		return nil, err
	}
	frag := FragmentDigest()
	var src debian.Package
	var rerr error
	if !o.Offline {
		src, rerr = resolveSource(ctx)
	} else {
		rerr = errors.New("offline")
	}
	if rerr != nil {
		if k, err := newestMinimal(dir, frag); err == nil {
			o.Log.Warn("cannot resolve the kernel source package, using the newest cached build of kiln's kernel", "version", k.PackageVersion, "err", rerr)
			return k, nil
		}
		return nil, fmt.Errorf("building kiln's kernel: %w (check apt-get update and network access, or use kernel = \"debian\")", rerr)
	}
	entry := filepath.Join(dir, minimalEntry(frag, src.Version))
	if k, err := loadMinimal(entry); err == nil {
		return k, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	unlock, err := lockBuild(ctx, filepath.Join(dir, ".build.lock"), o.Log)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Another process may have built it while we waited.
	if k, err := loadMinimal(entry); err == nil {
		return k, nil
	}
	if err := buildMinimal(ctx, o, dir, entry, src, frag); err != nil {
		return nil, fmt.Errorf("building kiln's kernel: %w", err)
	}
	return loadMinimal(entry)
}

// CachedMinimal lists the kernels built into the cache, newest source first.
func CachedMinimal() ([]*Kernel, error) {
	dir, err := cache.Sub("kernel/minimal")
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []*Kernel
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if k, err := loadMinimal(filepath.Join(dir, e.Name())); err == nil {
			out = append(out, k)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return CompareVersions(out[i].PackageVersion, out[j].PackageVersion) > 0 })
	return out, nil
}

// resolveSource asks apt for SourcePackage's candidate version.
func resolveSource(ctx context.Context) (debian.Package, error) {
	h, err := debian.Show(ctx, SourcePackage)
	if err != nil {
		return debian.Package{}, err
	}
	p := debian.Package{Name: SourcePackage, Version: h.Get("Version"), Arch: h.Get("Architecture")}
	if p.Version == "" || p.Arch == "" {
		return debian.Package{}, fmt.Errorf("apt-cache show %s: no Version or Architecture field", SourcePackage)
	}
	return p, nil
}

func minimalEntry(frag, version string) string {
	return frag[:16] + "_" + strings.ReplaceAll(version, ":", "%3a")
}

// loadMinimal reads a complete cache entry.
func loadMinimal(entry string) (*Kernel, error) {
	b, err := os.ReadFile(filepath.Join(entry, "kernel.json"))
	if err != nil {
		return nil, err
	}
	var bi BuildInfo
	if err := json.Unmarshal(b, &bi); err != nil {
		return nil, fmt.Errorf("reading %s: %w", filepath.Join(entry, "kernel.json"), err)
	}
	k := &Kernel{
		Kind:           KindMinimal,
		Version:        bi.Release,
		Package:        bi.SourcePackage,
		PackageVersion: bi.SourceVersion,
		Vmlinuz:        filepath.Join(entry, "vmlinux"),
		Config:         filepath.Join(entry, "config"),
		ConfigDigest:   bi.ConfigSHA256,
		Build:          &bi,
	}
	for _, p := range []string{k.Vmlinuz, k.Config} {
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
	}
	return k, nil
}

// newestMinimal returns the cached build of frag with the newest source.
func newestMinimal(dir, frag string) (*Kernel, error) {
	ks, err := CachedMinimal()
	if err != nil {
		return nil, err
	}
	for _, k := range ks {
		if k.Build.FragmentSHA256 == frag {
			return k, nil
		}
	}
	return nil, fmt.Errorf("no build of kiln's kernel cached in %s", dir)
}

// lockBuild takes an exclusive flock on path, polling so ctx can cancel
// the wait; the file stays (it holds no data), the lock goes with the fd.
func lockBuild(ctx context.Context, path string, log *slog.Logger) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening the kernel build lock: %w", err)
	}
	logged := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking %s: %w", path, err)
		}
		if !logged {
			log.Info("waiting for another kiln process building the kernel", "lock", path)
			logged = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for another kiln process building the kernel: %w", ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// CheckBuildTools reports the first missing build tool with its package.
func CheckBuildTools() error {
	var missing []string
	for _, t := range BuildTools {
		if _, err := exec.LookPath(t[0]); err != nil {
			missing = append(missing, t[1])
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("building kiln's kernel needs %s: install them (apt-get install %s, or run scripts/deps.sh), or use kernel = \"debian\"", strings.Join(missing, ", "), strings.Join(append(missing, "libelf-dev"), " "))
	}
	return nil
}

func buildMinimal(ctx context.Context, o BuildOptions, dir, entry string, src debian.Package, frag string) error {
	if err := CheckBuildTools(); err != nil {
		return err
	}
	want, err := ParseConfig(bytes.NewReader(Fragment))
	if err != nil {
		return fmt.Errorf("kiln.config: %w", err)
	}
	step := func(name string, fn func() (string, error)) error {
		if o.Progress != nil {
			o.Progress(name, false, "")
		}
		detail, err := fn()
		if err != nil {
			return err
		}
		if o.Progress != nil {
			o.Progress(name, true, detail)
		}
		o.Log.Debug("kernel build step", "step", name, "detail", detail)
		return ctx.Err()
	}
	t0 := time.Now()
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		return fmt.Errorf("creating the build directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	o.Log.Info("building kiln's kernel (once per machine; several minutes)", "source", src.Name+" "+src.Version, "dir", tmp)
	srcDir := filepath.Join(tmp, "linux")
	if err := step("kernel: fetch source", func() (string, error) {
		pkgs := []debian.Package{src}
		if err := debian.Download(ctx, pkgs, o.Log); err != nil {
			return "", err
		}
		deb := filepath.Join(tmp, "deb")
		if err := debian.Extract(ctx, pkgs, deb); err != nil {
			return "", err
		}
		tarball, err := findTarball(deb)
		if err != nil {
			return "", err
		}
		if err := os.MkdirAll(srcDir, 0o755); err != nil {
			return "", err
		}
		if err := run(ctx, tmp, nil, "tar", "-xJf", tarball, "-C", srcDir, "--strip-components=1"); err != nil {
			return "", fmt.Errorf("unpacking %s: %w", filepath.Base(tarball), err)
		}
		if err := os.RemoveAll(deb); err != nil {
			return "", err
		}
		return src.Name + " " + src.Version, nil
	}); err != nil {
		return err
	}
	if err := step("kernel: configure", func() (string, error) {
		fragPath := filepath.Join(tmp, "kiln.config")
		if err := os.WriteFile(fragPath, Fragment, 0o644); err != nil {
			return "", err
		}
		if err := run(ctx, srcDir, nil, "make", "tinyconfig"); err != nil {
			return "", err
		}
		if err := run(ctx, srcDir, nil, "bash", "scripts/kconfig/merge_config.sh", "-m", ".config", fragPath); err != nil {
			return "", err
		}
		if err := run(ctx, srcDir, nil, "make", "olddefconfig"); err != nil {
			return "", err
		}
		f, err := os.Open(filepath.Join(srcDir, ".config"))
		if err != nil {
			return "", err
		}
		defer f.Close()
		got, err := ParseConfig(f)
		if err != nil {
			return "", err
		}
		if err := CheckConfig(want, got); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d options from kiln.config onto tinyconfig", len(want)), nil
	}); err != nil {
		return err
	}
	jobs := o.Jobs
	if jobs <= 0 {
		jobs = runtime.NumCPU()
	}
	if err := step("kernel: compile", func() (string, error) {
		n := 0
		last := time.Now()
		c0 := time.Now()
		onLine := func(line string) {
			if !strings.HasPrefix(line, "  CC ") && !strings.HasPrefix(line, "  AS ") {
				return
			}
			n++
			if o.Tick != nil && time.Since(last) >= 5*time.Second {
				last = time.Now()
				o.Tick("kernel: compile", fmt.Sprintf("%d files compiled in %s", n, time.Since(c0).Round(time.Second)))
			}
		}
		if err := run(ctx, srcDir, onLine, "make", "-j"+strconv.Itoa(jobs), "vmlinux"); err != nil {
			return "", err
		}
		return fmt.Sprintf("%d files with -j%d", n, jobs), nil
	}); err != nil {
		return err
	}
	return step("kernel: install", func() (string, error) {
		out := filepath.Join(tmp, "out")
		if err := os.Mkdir(out, 0o755); err != nil {
			return "", err
		}
		rel, err := os.ReadFile(filepath.Join(srcDir, "include", "config", "kernel.release"))
		if err != nil {
			return "", fmt.Errorf("reading the kernel release: %w", err)
		}
		bi := BuildInfo{
			Release:        strings.TrimSpace(string(rel)),
			SourcePackage:  src.Name,
			SourceVersion:  src.Version,
			FragmentSHA256: frag,
			Jobs:           jobs,
			Options:        len(want),
		}
		// Symbols are of no use to a guest without modules or kallsyms:
		// strip them (the PVH note is an allocated section and stays).
		stripped := filepath.Join(tmp, "vmlinux.stripped")
		if err := run(ctx, srcDir, nil, "objcopy", "--strip-all", "vmlinux", stripped); err != nil {
			return "", err
		}
		if bi.VmlinuxSHA256, bi.VmlinuxSize, err = copyHashed(stripped, filepath.Join(out, "vmlinux")); err != nil {
			return "", err
		}
		if bi.ConfigSHA256, _, err = copyHashed(filepath.Join(srcDir, ".config"), filepath.Join(out, "config")); err != nil {
			return "", err
		}
		bi.BuildSeconds = time.Since(t0).Seconds()
		b, err := json.MarshalIndent(bi, "", "  ")
		if err != nil {
			return "", err
		}
		if err := os.WriteFile(filepath.Join(out, "kernel.json"), append(b, '\n'), 0o644); err != nil {
			return "", err
		}
		if err := os.Rename(out, entry); err != nil {
			if _, lerr := loadMinimal(entry); lerr == nil {
				return "already cached", nil
			}
			return "", fmt.Errorf("storing the kernel in the cache: %w", err)
		}
		syncDir(dir)
		return fmt.Sprintf("%s, vmlinux sha256:%s", bi.Release, bi.VmlinuxSHA256), nil
	})
}

// findTarball returns the linux-source tarball in an extracted .deb.
func findTarball(root string) (string, error) {
	m, err := filepath.Glob(filepath.Join(root, "usr", "src", "linux-source-*.tar.xz"))
	if err != nil || len(m) != 1 {
		return "", fmt.Errorf("%s has no usr/src/linux-source-*.tar.xz (found %v)", SourcePackage, m)
	}
	return m[0], nil
}

// run runs a build command in dir with kbuild's reproducible environment;
// each output line goes to onLine when set, and the output's tail is in
// the error.
func run(ctx context.Context, dir string, onLine func(string), name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = buildEnv()
	cmd.WaitDelay = 5 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	tail := newTail(64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			tail.add(sc.Text())
			if onLine != nil {
				onLine(sc.Text())
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	err := cmd.Run()
	pw.Close()
	<-done
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%s %s: %w:\n%s", name, strings.Join(args, " "), err, tail.String())
	}
	return nil
}

// buildEnv is the environment minus a parent make's settings (its
// jobserver fds are not inherited) plus kbuildEnv.
func buildEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "ARCH", "CROSS_COMPILE", "LC_ALL", "TZ",
			"KBUILD_BUILD_TIMESTAMP", "KBUILD_BUILD_USER", "KBUILD_BUILD_HOST", "KBUILD_BUILD_VERSION", "KCONFIG_CONFIG", "O":
			continue
		}
		env = append(env, kv)
	}
	return append(env, kbuildEnv...)
}

type lineTail struct {
	max   int
	lines []string
}

func newTail(n int) *lineTail { return &lineTail{max: n} }

func (t *lineTail) add(l string) {
	t.lines = append(t.lines, l)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

func (t *lineTail) String() string { return strings.Join(t.lines, "\n") }

// copyHashed copies src to dst and returns the sha256 and size.
func copyHashed(src, dst string) (string, int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", 0, err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", 0, fmt.Errorf("copying %s: %w", filepath.Base(src), err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// FileDigest returns the sha256 (hex) of a file.
func FileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
