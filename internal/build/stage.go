// Package build stages a Python root filesystem tree (interpreter, packages, ELF closure) and makes its erofs image.
package build

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net/textproto"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/kiln-dev/kiln/internal/build/debian"
	"github.com/kiln-dev/kiln/internal/build/elfdeps"
	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/spec"
)

// Guest paths of the staged layout.
const (
	guestLibDir = "/usr/lib/x86_64-linux-gnu"
	guestLdso   = "/usr/lib64/ld-linux-x86-64.so.2"
	debSiteDir  = "/usr/lib/python3/dist-packages"
	optPython   = "/opt/python"
)

// StageOptions tune StageRootfs.
type StageOptions struct {
	// Python is the interpreter from the spec; resolved on PATH if not absolute.
	Python string
	// Agent is the agent's Python source, written to proto.AgentPath when non-empty.
	Agent []byte
	// Log receives progress details; nil discards them.
	Log *slog.Logger
	// Progress, when set, is called when a step starts (detail "") and when
	// it ends (detail non-empty).
	Progress func(step, detail string)
}

// Distribution is one Python distribution in the image.
type Distribution struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Source  string `json:"source"` // "debian", "pip" or "python"
}

// Stage describes a staged root filesystem tree.
type Stage struct {
	Dir           string // the staged tree; the caller removes it
	PythonVersion string // e.g. "3.11.2"
	PythonExe     string // guest path of the real interpreter binary
	Debian        bool   // the interpreter is Debian's own
	Distributions []Distribution
	Modules       []string // top-level modules of the site directories
	Files         int      // regular files in the tree
	TreeBytes     int64    // their total size
}

// pyInfo is what the probe script reports about an interpreter.
type pyInfo struct {
	Version    []int    `json:"version"`
	Executable string   `json:"executable"`
	Prefix     string   `json:"prefix"`
	BasePrefix string   `json:"base_prefix"`
	Stdlib     string   `json:"stdlib"`
	Purelib    string   `json:"purelib"`
	Platlib    string   `json:"platlib"`
	Path       []string `json:"path"`
	Debian     bool     `json:"debian"`
	Conda      bool     `json:"conda"`
}

const probeScript = `
import json, os, sys, sysconfig
p = sysconfig.get_paths()
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "executable": os.path.realpath(sys.executable),
    "prefix": sys.prefix,
    "base_prefix": sys.base_prefix,
    "stdlib": p["stdlib"],
    "purelib": p["purelib"],
    "platlib": p["platlib"],
    "path": sys.path,
    "debian": sys.base_prefix == "/usr" and os.path.isdir("/usr/lib/python3/dist-packages"),
    "conda": os.path.isdir(os.path.join(sys.prefix, "conda-meta")),
}))
`

func (p *pyInfo) short() string { return fmt.Sprintf("%d.%d", p.Version[0], p.Version[1]) }

// lookPython resolves the interpreter name to an absolute path.
func lookPython(name string) (string, error) {
	if name == "" {
		name = "/usr/bin/python3"
	}
	if filepath.IsAbs(name) {
		if _, err := os.Stat(name); err != nil {
			return "", fmt.Errorf("python interpreter %s not found: install it or set python in kiln.toml to an existing interpreter", name)
		}
		return name, nil
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("python interpreter %q not found on PATH: install it or set python in kiln.toml to an interpreter path", name)
	}
	return filepath.Abs(p)
}

func probePython(ctx context.Context, python string) (*pyInfo, error) {
	cmd := exec.CommandContext(ctx, python, "-I", "-c", probeScript)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("probing python interpreter %s (is it a working Python 3?): %w: %s", python, err, tailString(stderr.String(), 1000))
	}
	var info pyInfo
	if err := json.Unmarshal(stdout.Bytes(), &info); err != nil {
		return nil, fmt.Errorf("probing python interpreter %s: bad probe output: %w", python, err)
	}
	if len(info.Version) != 3 || info.Version[0] != 3 || info.Executable == "" || info.Stdlib == "" {
		return nil, fmt.Errorf("python interpreter %s is not a usable Python 3 (version %v)", python, info.Version)
	}
	return &info, nil
}

// layout holds the guest paths chosen for an interpreter.
type layout struct {
	exe    string // real interpreter binary
	stdlib string
	site   string // where venv packages and pip requirements go
}

func layoutFor(info *pyInfo) layout {
	v := "python" + info.short()
	if info.Debian {
		return layout{
			exe:    "/usr/bin/" + v,
			stdlib: "/usr/lib/" + v,
			site:   "/usr/local/lib/" + v + "/dist-packages",
		}
	}
	return layout{
		exe:    optPython + "/bin/" + v,
		stdlib: optPython + "/lib/" + v,
		site:   optPython + "/lib/" + v + "/site-packages",
	}
}

// stager carries the state of one StageRootfs call.
type stager struct {
	ctx  context.Context
	s    *spec.Spec
	o    StageOptions
	log  *slog.Logger
	dir  string
	keep map[string]bool
}

// host maps a guest path to its place in the staged tree.
func (st *stager) host(guest string) string {
	return filepath.Join(st.dir, filepath.FromSlash(path.Clean("/"+guest)))
}

func (st *stager) step(name string, fn func() (string, error)) error {
	if st.o.Progress != nil {
		st.o.Progress(name, "")
	}
	detail, err := fn()
	if err != nil {
		return err
	}
	if detail == "" {
		detail = "done"
	}
	st.log.Debug("stage step", "step", name, "detail", detail)
	if st.o.Progress != nil {
		st.o.Progress(name, detail)
	}
	return st.ctx.Err()
}

// StageRootfs builds the root filesystem tree of s in dir (created if
// missing; it must be empty). On error the partial tree is left for the
// caller to remove with dir.
func StageRootfs(ctx context.Context, s *spec.Spec, o StageOptions, dir string) (*Stage, error) {
	log := o.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if o.Python == "" {
		o.Python = s.Python
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving staging directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating staging directory: %w", err)
	}
	if ents, err := os.ReadDir(dir); err != nil {
		return nil, fmt.Errorf("reading staging directory: %w", err)
	} else if len(ents) > 0 {
		return nil, fmt.Errorf("staging directory %s is not empty", dir)
	}
	st := &stager{ctx: ctx, s: s, o: o, log: log, dir: dir, keep: map[string]bool{}}
	for _, k := range s.Keep {
		st.keep[k] = true
	}

	python, err := lookPython(o.Python)
	if err != nil {
		return nil, err
	}
	info, err := probePython(ctx, python)
	if err != nil {
		return nil, err
	}
	if py := pythonPackages(s.Debian); len(py) > 0 && !info.Debian {
		return nil, fmt.Errorf("debian packages only fit Debian's own interpreter /usr/bin/python3 when they hold Python modules (%s); set python = \"/usr/bin/python3\" or use requirements", strings.Join(py, ", "))
	}
	lay := layoutFor(info)
	res := &Stage{
		Dir:           dir,
		PythonVersion: fmt.Sprintf("%d.%d.%d", info.Version[0], info.Version[1], info.Version[2]),
		PythonExe:     lay.exe,
		Debian:        info.Debian,
	}
	var dists []Distribution

	if err := st.step("layout", func() (string, error) { return "", st.skeleton() }); err != nil {
		return nil, err
	}
	if err := st.step("python "+res.PythonVersion, func() (string, error) {
		return "", st.stagePython(info, lay)
	}); err != nil {
		return nil, err
	}
	if d, err := readDistributions(st.host(lay.site), "python"); err != nil {
		return nil, err
	} else {
		dists = append(dists, d...)
	}

	// Every image carries a POSIX shell, Debian's dash, as /bin/sh: shell
	// tasks and `kiln run IMAGE -- sh -c …` need one.
	debs := s.Debian
	if !slices.Contains(debs, ShellPackage) {
		debs = append(slices.Clone(debs), ShellPackage)
	}
	roots := []string{"/"}
	if len(debs) > 0 {
		debroot, err := os.MkdirTemp("", "kiln-debroot-")
		if err != nil {
			return nil, fmt.Errorf("creating Debian extraction directory: %w", err)
		}
		defer os.RemoveAll(debroot)
		var named []Distribution
		if err := st.step("debian packages", func() (detail string, err error) {
			detail, named, err = st.stageDebian(debroot, debs)
			return detail, err
		}); err != nil {
			return nil, err
		}
		dists = append(dists, named...)
		roots = []string{debroot, "/"}
		d, err := readDistributions(st.host(debSiteDir), "debian")
		if err != nil {
			return nil, err
		}
		dists = append(dists, d...)
	}

	if len(s.Requirements) > 0 || s.RequirementsFile != "" {
		before := map[string]bool{}
		for _, d := range dists {
			before[d.Name] = true
		}
		if err := st.step("pip install", func() (string, error) {
			return "", st.pipInstall(python, lay)
		}); err != nil {
			return nil, err
		}
		d, err := readDistributions(st.host(lay.site), "pip")
		if err != nil {
			return nil, err
		}
		for _, x := range d {
			if !before[x.Name] {
				dists = append(dists, x)
			}
		}
	}

	if err := st.step("files", func() (string, error) { return "", st.stageFiles() }); err != nil {
		return nil, err
	}
	if len(o.Agent) > 0 {
		if err := writeFile(st.host(proto.AgentPath), o.Agent, 0o644); err != nil {
			return nil, err
		}
	}

	if err := st.step("shared libraries", func() (string, error) {
		return st.stageLibs(roots)
	}); err != nil {
		return nil, err
	}
	compileDirs := []string{lay.stdlib, lay.site, debSiteDir, path.Dir(proto.AgentPath)}
	for _, g := range s.Files {
		compileDirs = append(compileDirs, g)
	}
	if err := st.step("byte-compile", func() (string, error) {
		return "", st.compile(python, compileDirs)
	}); err != nil {
		return nil, err
	}
	if err := normalizeModes(dir); err != nil {
		return nil, err
	}
	sort.Slice(dists, func(i, j int) bool {
		if dists[i].Name != dists[j].Name {
			return dists[i].Name < dists[j].Name
		}
		return dists[i].Source < dists[j].Source
	})
	res.Distributions = dists
	if res.Modules, err = topModules(st.host(lay.site), st.host(debSiteDir)); err != nil {
		return nil, err
	}
	res.Files, res.TreeBytes, err = treeStats(dir)
	if err != nil {
		return nil, err
	}
	return res, nil
}

// skeleton creates the merged-/usr layout, empty mount points and /etc files.
func (st *stager) skeleton() error {
	for _, d := range []string{"usr/bin", "usr/sbin", "usr/lib64", "usr/lib/x86_64-linux-gnu", "proc", "sys", "dev", "tmp", "run", "var/tmp", "root", "home", "etc"} {
		if err := os.MkdirAll(filepath.Join(st.dir, d), 0o755); err != nil {
			return fmt.Errorf("creating layout: %w", err)
		}
	}
	for _, l := range [][2]string{{"bin", "usr/bin"}, {"sbin", "usr/sbin"}, {"lib", "usr/lib"}, {"lib64", "usr/lib64"}} {
		if err := os.Symlink(l[1], filepath.Join(st.dir, l[0])); err != nil {
			return fmt.Errorf("creating layout: %w", err)
		}
	}
	files := map[string]string{
		"/etc/hostname":      "kiln\n",
		"/etc/passwd":        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
		"/etc/group":         "root:x:0:\nnogroup:x:65534:\n",
		"/etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
		"/etc/hosts":         "127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n",
	}
	for g, c := range files {
		if err := writeFile(st.host(g), []byte(c), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// stagePython copies the interpreter, its pruned stdlib and, for a venv or
// conda environment, its site-packages.
func (st *stager) stagePython(info *pyInfo, lay layout) error {
	if err := copyFile(info.Executable, st.host(lay.exe)); err != nil {
		return fmt.Errorf("copying python interpreter: %w", err)
	}
	v := "python" + info.short()
	links := [][2]string{}
	if info.Debian {
		links = append(links, [2]string{"/usr/bin/python3", v})
		if d := "/etc/" + v; isDir(d) {
			if err := copyTree(d, st.host(d), st.skipCache); err != nil {
				return err
			}
		}
	} else {
		links = append(links,
			[2]string{"/usr/bin/python3", lay.exe},
			[2]string{"/usr/bin/" + v, lay.exe},
			[2]string{path.Dir(lay.exe) + "/python3", v},
			[2]string{path.Dir(lay.exe) + "/python", v})
	}
	links = append(links, [2]string{"/usr/bin/python", "python3"})
	for _, l := range links {
		if err := symlink(l[1], st.host(l[0])); err != nil {
			return err
		}
	}
	if err := copyTree(info.Stdlib, st.host(lay.stdlib), st.skipStdlib); err != nil {
		return fmt.Errorf("copying the python standard library: %w", err)
	}
	if info.Prefix != info.BasePrefix || info.Conda {
		done := map[string]bool{}
		for _, site := range []string{info.Purelib, info.Platlib} {
			if site == "" || done[site] || !isDir(site) {
				continue
			}
			done[site] = true
			if err := copyTree(site, st.host(lay.site), st.skipSite); err != nil {
				return fmt.Errorf("copying site-packages of %s: %w", info.Prefix, err)
			}
		}
		os.RemoveAll(st.host(lay.site + "/bin"))
	}
	return nil
}

// skipCache drops __pycache__ directories and stale .pyc files.
func (st *stager) skipCache(rel string, d fs.DirEntry) bool {
	name := d.Name()
	return name == "__pycache__" || (!d.IsDir() && (strings.HasSuffix(name, ".pyc") || strings.HasSuffix(name, ".pyo")))
}

// skipStdlib prunes the standard library.
func (st *stager) skipStdlib(rel string, d fs.DirEntry) bool {
	if st.skipCache(rel, d) {
		return true
	}
	name := d.Name()
	if !strings.Contains(rel, "/") {
		switch {
		case name == "site-packages" || name == "dist-packages":
			return true
		case name == "test" || name == "idlelib" || name == "tkinter" || name == "ensurepip" || name == "lib2to3" || name == "pydoc_data":
			return !st.keep[name]
		case name == "turtledemo":
			return !st.keep["tkinter"]
		case strings.HasPrefix(name, "config-3"):
			return !st.keep["config"]
		}
	}
	if strings.HasPrefix(rel, "lib-dynload/_tkinter") {
		return !st.keep["tkinter"]
	}
	return false
}

// skipSite prunes package test directories.
func (st *stager) skipSite(rel string, d fs.DirEntry) bool {
	if st.skipCache(rel, d) {
		return true
	}
	name := d.Name()
	return d.IsDir() && (name == "tests" || name == "test") && !st.keep[name]
}

// ShellPackage is the Debian package that gives every image its /bin/sh.
const ShellPackage = "dash"

// pythonPackages returns the Debian packages of names that hold Python
// modules for Debian's interpreter (python3 and python3-*).
func pythonPackages(names []string) []string {
	var out []string
	for _, n := range names {
		if n == "python3" || strings.HasPrefix(n, "python3-") {
			out = append(out, n)
		}
	}
	return out
}

// stageDebian fetches spec.Debian and their dependencies into debroot (the
// ELF closure's first root), copies the Python packages of all of them,
// and copies everything the named packages themselves ship (libraries,
// programs, data; not their documentation), so that a plain library
// package such as libgomp1 lands in the image even when nothing links to
// it. It returns the step's detail and the named packages as
// distributions.
func (st *stager) stageDebian(debroot string, names []string) (string, []Distribution, error) {
	pkgs, err := debian.Resolve(st.ctx, names)
	if err != nil {
		return "", nil, err
	}
	if err := debian.Download(st.ctx, pkgs, st.log); err != nil {
		return "", nil, err
	}
	if err := debian.Extract(st.ctx, pkgs, debroot); err != nil {
		return "", nil, err
	}
	src := filepath.Join(debroot, debSiteDir)
	if isDir(src) {
		if err := copyTree(src, st.host(debSiteDir), st.skipSite); err != nil {
			return "", nil, fmt.Errorf("copying Debian python packages: %w", err)
		}
	}
	var named []debian.Package
	var dists []Distribution
	for _, p := range pkgs {
		if slices.Contains(names, p.Name) {
			named = append(named, p)
			if len(pythonPackages([]string{p.Name})) == 0 {
				dists = append(dists, Distribution{Name: p.Name, Version: p.Version, Source: "debian-package"})
			}
		}
	}
	own, err := os.MkdirTemp("", "kiln-debnamed-")
	if err != nil {
		return "", nil, fmt.Errorf("creating Debian extraction directory: %w", err)
	}
	defer os.RemoveAll(own)
	if err := debian.Extract(st.ctx, named, own); err != nil {
		return "", nil, err
	}
	if err := copyTree(own, st.dir, skipDebianDocs); err != nil {
		return "", nil, fmt.Errorf("copying the files of Debian packages %s: %w", strings.Join(names, ", "), err)
	}
	n := 0
	if isDir(st.host(debSiteDir)) {
		if n, err = st.symlinkTargets(debSiteDir, debroot); err != nil {
			return "", nil, err
		}
	}
	return fmt.Sprintf("%d packages, %d linked files", len(pkgs), n), dists, nil
}

// skipDebianDocs leaves out what a Debian package ships for people or for
// dpkg, and the Python packages (copied from the whole closure already).
func skipDebianDocs(rel string, d fs.DirEntry) bool {
	switch rel {
	case "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/bug",
		"usr/share/doc-base", "usr/share/locale", "etc/init.d", "etc/cron.daily", "etc/logrotate.d", debSiteDir[1:]:
		return true
	}
	return false
}

// symlinkTargets copies, from root, the targets of the symlinks under the
// guest directory dir that point out of the staged tree. Debian's packages
// link to their libraries this way (torch/lib/libtorch_global_deps.so →
// /usr/lib/x86_64-linux-gnu/…), and Python opens some of them with ctypes,
// so the ELF closure alone would not bring them in.
func (st *stager) symlinkTargets(dir, root string) (int, error) {
	n := 0
	err := filepath.WalkDir(st.host(dir), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Type()&fs.ModeSymlink == 0 {
			return err
		}
		if _, err := os.Stat(p); err == nil {
			return nil // resolves inside the staged tree
		}
		guest := "/" + strings.TrimPrefix(p, st.dir+"/")
		target, err := os.Readlink(p)
		if err != nil {
			return err
		}
		if !path.IsAbs(target) {
			target = path.Join(path.Dir(guest), target)
		}
		src, ok := elfdeps.ResolveIn(root, target)
		if !ok {
			return nil // dangling in the package too: leave it
		}
		if err := copyFile(src, st.host(path.Clean(target))); err != nil {
			return fmt.Errorf("copying %s, the target of %s: %w", target, guest, err)
		}
		n++
		return nil
	})
	if err != nil {
		return n, fmt.Errorf("copying symlinked files of Debian packages: %w", err)
	}
	return n, nil
}

const pipHint = `pip failed; kiln builds offline-friendly: add pip_args such as ["--no-index", "--find-links", "./wheels"] to kiln.toml`

// pipInstall installs the requirements into the layout's site directory.
func (st *stager) pipInstall(python string, lay layout) error {
	target := st.host(lay.site)
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("creating site-packages: %w", err)
	}
	args := []string{"-s", "-m", "pip", "install", "--target", target, "--no-compile",
		"--no-warn-script-location", "--disable-pip-version-check", "--no-input"}
	args = append(args, st.s.PipArgs...)
	if st.s.RequirementsFile != "" {
		args = append(args, "-r", st.s.RequirementsFile)
	}
	args = append(args, st.s.Requirements...)
	cmd := exec.CommandContext(st.ctx, python, args...)
	cmd.Dir = st.s.Dir
	cmd.Env = append(os.Environ(), "PIP_BREAK_SYSTEM_PACKAGES=1", "PYTHONDONTWRITEBYTECODE=1", "SOURCE_DATE_EPOCH=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = logWriter{st.log, "pip"}
	if err := cmd.Run(); err != nil {
		if st.ctx.Err() != nil {
			return st.ctx.Err()
		}
		msg := tailString(stderr.String(), 2000)
		if strings.Contains(msg, "No module named pip") {
			return fmt.Errorf("pip is not available for %s: install python3-pip or use an interpreter with pip", python)
		}
		return fmt.Errorf("%s\n%s: %w", msg, pipHint, err)
	}
	os.RemoveAll(filepath.Join(target, "bin"))
	return pruneTree(target, st.skipSite)
}

// stageFiles copies spec.Files (host source relative to spec.Dir -> guest path).
func (st *stager) stageFiles() error {
	srcs := make([]string, 0, len(st.s.Files))
	for k := range st.s.Files {
		srcs = append(srcs, k)
	}
	sort.Strings(srcs)
	for _, src := range srcs {
		dest := st.s.Files[src]
		if !path.IsAbs(dest) {
			return fmt.Errorf("files: destination %q of %q must be an absolute guest path", dest, src)
		}
		hsrc := src
		if !filepath.IsAbs(hsrc) {
			hsrc = filepath.Join(st.s.Dir, src)
		}
		fi, err := os.Stat(hsrc)
		if err != nil {
			return fmt.Errorf("files: %w: fix the source path in kiln.toml (relative to %s)", err, st.s.Dir)
		}
		if strings.HasSuffix(dest, "/") {
			dest = path.Join(dest, filepath.Base(hsrc))
		}
		if fi.IsDir() {
			err = copyTree(hsrc, st.host(dest), st.skipCache)
		} else {
			err = copyFile(hsrc, st.host(dest))
		}
		if err != nil {
			return fmt.Errorf("files: copying %s to %s: %w", src, dest, err)
		}
	}
	return nil
}

// stageLibs copies the ELF closure of every staged ELF file into guestLibDir.
func (st *stager) stageLibs(roots []string) (string, error) {
	var elfs []string
	err := filepath.WalkDir(st.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() && elfdeps.IsELF(p) {
			elfs = append(elfs, p)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("scanning staged files: %w", err)
	}
	r := &elfdeps.Resolver{Roots: roots, Log: st.log}
	var libs []elfdeps.Lib
	var interp string
	dropped := 0
	for {
		libs, interp, err = r.Closure(elfs)
		var miss *elfdeps.MissingError
		if err == nil || !errors.As(err, &miss) || !droppable(st.dir, miss.File) {
			break
		}
		// A program shipped inside a Python package (torch/bin/test_jit, say)
		// that needs a library no package provides could never run: leave
		// it out rather than fail the build. Extension modules and the
		// interpreter's own libraries stay errors.
		st.log.Warn("leaving out a program whose library is missing", "program", strings.TrimPrefix(miss.File, st.dir), "missing", miss.Soname)
		if err := os.Remove(miss.File); err != nil {
			return "", fmt.Errorf("removing %s: %w", miss.File, err)
		}
		elfs = slices.DeleteFunc(elfs, func(p string) bool { return p == miss.File })
		dropped++
	}
	if err != nil {
		return "", fmt.Errorf("resolving shared libraries: %w", err)
	}
	// glibc dlopens libgcc_s for thread cancellation and unwinding.
	for _, root := range roots {
		if p, ok := elfdeps.ResolveIn(root, guestLibDir+"/libgcc_s.so.1"); ok {
			libs = append(libs, elfdeps.Lib{Soname: "libgcc_s.so.1", Path: p})
			break
		}
	}
	if interp != "" {
		libs = append(libs, elfdeps.Lib{Soname: path.Base(guestLdso), Path: interp})
	}
	n := 0
	for _, l := range libs {
		if strings.HasPrefix(l.Path, st.dir+"/") {
			continue // already in the image, reached through its RPATH
		}
		dst := st.host(guestLibDir + "/" + l.Soname)
		if _, err := os.Lstat(dst); err == nil {
			continue
		}
		if err := copyFile(l.Path, dst); err != nil {
			return "", fmt.Errorf("copying library %s: %w", l.Soname, err)
		}
		n++
	}
	if interp != "" {
		if err := symlink("../lib/x86_64-linux-gnu/"+path.Base(guestLdso), st.host(guestLdso)); err != nil {
			return "", err
		}
	}
	detail := fmt.Sprintf("%d ELF files, %d libraries", len(elfs), n)
	if dropped > 0 {
		detail += fmt.Sprintf(", %d programs left out (missing libraries)", dropped)
	}
	return detail, nil
}

// droppable reports whether the ELF file at p may be left out of the image
// when a library it needs is missing: a program (not a shared object)
// inside a Python package directory of the staged tree.
func droppable(dir, p string) bool {
	rel, ok := strings.CutPrefix(p, dir+"/")
	if !ok || !(strings.Contains(rel, "/dist-packages/") || strings.Contains(rel, "/site-packages/")) {
		return false
	}
	base := filepath.Base(p)
	return !strings.HasSuffix(base, ".so") && !strings.Contains(base, ".so.")
}

// compile byte-compiles the staged Python sources with the build interpreter,
// recording guest paths and no timestamps.
func (st *stager) compile(python string, guestDirs []string) error {
	var dirs []string
	seen := map[string]bool{}
	for _, g := range guestDirs {
		h := st.host(g)
		if seen[h] || !isDir(h) {
			continue
		}
		seen[h] = true
		dirs = append(dirs, h)
	}
	if len(dirs) == 0 {
		return nil
	}
	slices.Sort(dirs)
	args := append([]string{"-s", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", "-s", st.dir, "-p", "/"}, dirs...)
	cmd := exec.CommandContext(st.ctx, python, args...)
	cmd.Env = append(os.Environ(), "SOURCE_DATE_EPOCH=0", "PYTHONHASHSEED=0")
	cmd.Env = slices.DeleteFunc(cmd.Env, func(e string) bool { return strings.HasPrefix(e, "PYTHONPYCACHEPREFIX=") })
	out, err := cmd.CombinedOutput()
	if err != nil {
		if st.ctx.Err() != nil {
			return st.ctx.Err()
		}
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 1 {
			// Some sources do not compile (Python 2 leftovers, templates): they stay as sources.
			st.log.Warn("some Python files did not byte-compile", "output", tailString(string(out), 2000))
			return nil
		}
		return fmt.Errorf("byte-compiling with %s: %w: %s", python, err, tailString(string(out), 2000))
	}
	return nil
}

// topModules lists the importable top-level modules of site directories:
// packages (directories, namespace packages too), .py files and extension
// modules, sorted and without repeats.
func topModules(sites ...string) ([]string, error) {
	seen := map[string]bool{}
	for _, site := range sites {
		ents, err := os.ReadDir(site)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listing modules in %s: %w", site, err)
		}
		for _, e := range ents {
			name := e.Name()
			var mod string
			switch {
			case e.IsDir():
				if !strings.Contains(name, ".") && name != "__pycache__" {
					mod = name
				}
			case strings.HasSuffix(name, ".py"):
				mod = strings.TrimSuffix(name, ".py")
			case strings.HasSuffix(name, ".so"):
				mod, _, _ = strings.Cut(name, ".")
			}
			if mod != "" && !strings.HasPrefix(mod, "_distutils_hack") {
				seen[mod] = true
			}
		}
	}
	return slices.Sorted(maps.Keys(seen)), nil
}

// readDistributions lists the distributions installed in a site directory.
func readDistributions(site, source string) ([]Distribution, error) {
	ents, err := os.ReadDir(site)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", site, err)
	}
	var out []Distribution
	for _, e := range ents {
		var meta string
		switch name := e.Name(); {
		case strings.HasSuffix(name, ".dist-info") && e.IsDir():
			meta = filepath.Join(site, name, "METADATA")
		case strings.HasSuffix(name, ".egg-info") && e.IsDir():
			meta = filepath.Join(site, name, "PKG-INFO")
		case strings.HasSuffix(name, ".egg-info"):
			meta = filepath.Join(site, name)
		default:
			continue
		}
		f, err := os.Open(meta)
		if err != nil {
			continue
		}
		d := parseMetadata(f)
		f.Close()
		if d.Name != "" {
			d.Source = source
			out = append(out, d)
		}
	}
	return out, nil
}

// parseMetadata reads Name and Version from core metadata headers (an RFC
// 822 style header block, parsed with net/textproto like Debian control
// files). A malformed line ends the header block.
func parseMetadata(r io.Reader) Distribution {
	h, _ := textproto.NewReader(bufio.NewReader(r)).ReadMIMEHeader()
	return Distribution{Name: strings.TrimSpace(h.Get("Name")), Version: strings.TrimSpace(h.Get("Version"))}
}

// logWriter forwards a subprocess's output lines to the debug log.
type logWriter struct {
	log  *slog.Logger
	what string
}

func (w logWriter) Write(p []byte) (int, error) {
	for _, l := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		if l != "" {
			w.log.Debug(l, "from", w.what)
		}
	}
	return len(p), nil
}

func tailString(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}
