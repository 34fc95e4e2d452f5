// Package elfdeps computes the shared-library closure of ELF files with debug/elf, without running ldd.
package elfdeps

import (
	"bufio"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// MultiarchDir is the Debian multiarch library directory of the guest architecture.
const MultiarchDir = "/usr/lib/x86_64-linux-gnu"

// defaultDirs are searched after DT_RPATH/DT_RUNPATH and the ld.so.conf paths.
var defaultDirs = []string{
	"/lib/x86_64-linux-gnu",
	"/usr/lib/x86_64-linux-gnu",
	"/lib64",
	"/usr/lib64",
	"/lib",
	"/usr/lib",
}

// alternativesDirs are searched as a last resort: Debian reaches libraries
// such as libblas.so.3 through /etc/alternatives symlinks that do not exist
// in extracted .deb files.
var alternativesDirs = []string{"/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"}

// Resolver finds the shared libraries ELF files need under a list of filesystem roots.
type Resolver struct {
	// Roots are filesystem roots searched in order, e.g. {debroot, "/"};
	// a library found under an earlier root wins.
	Roots []string
	// Log receives debug messages; nil discards them.
	Log *slog.Logger

	confDirs map[string][]string // root -> ld.so.conf directories
}

// Lib is a resolved shared library.
type Lib struct {
	Soname string
	// Path is the host path where the library was found: root-prefixed, symlinks resolved.
	Path string
}

// MissingError reports a library that no search path provides.
type MissingError struct {
	Soname string // the missing library
	File   string // the file that needs it
}

func (e *MissingError) Error() string {
	return fmt.Sprintf("library %s needed by %s not found: install the Debian package that provides it or add it to the image", e.Soname, e.File)
}

// IsELF reports whether path is a readable regular ELF file.
func IsELF(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var magic [4]byte
	if _, err := io.ReadFull(f, magic[:]); err != nil {
		return false
	}
	return string(magic[:]) == elf.ELFMAG
}

func (r *Resolver) log() *slog.Logger {
	if r.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return r.Log
}

func (r *Resolver) roots() []string {
	if len(r.Roots) == 0 {
		return []string{"/"}
	}
	return r.Roots
}

// elfInfo is what the closure needs from one ELF file.
type elfInfo struct {
	needed []string
	rpath  []string // DT_RPATH, used only when runpath is empty
	run    []string // DT_RUNPATH
	interp string
}

// readELF parses path; ok is false for non-ELF files and ELF files of another
// machine or class.
func readELF(p string) (info elfInfo, ok bool, err error) {
	if !IsELF(p) {
		if _, serr := os.Stat(p); serr != nil {
			return info, false, fmt.Errorf("reading %s: %w", p, serr)
		}
		return info, false, nil
	}
	f, err := elf.Open(p)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return info, false, nil
		}
		return info, false, fmt.Errorf("reading ELF %s: %w", p, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return info, false, nil
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return info, false, nil
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			b, err := io.ReadAll(prog.Open())
			if err != nil {
				return info, false, fmt.Errorf("reading interpreter of %s: %w", p, err)
			}
			info.interp = strings.TrimRight(string(b), "\x00")
		}
	}
	if f.Section(".dynamic") == nil && dynProg(f) == nil {
		return info, true, nil // static
	}
	if info.needed, err = f.ImportedLibraries(); err != nil {
		return info, false, fmt.Errorf("reading DT_NEEDED of %s: %w", p, err)
	}
	rp, err := f.DynString(elf.DT_RPATH)
	if err != nil {
		return info, false, fmt.Errorf("reading DT_RPATH of %s: %w", p, err)
	}
	rn, err := f.DynString(elf.DT_RUNPATH)
	if err != nil {
		return info, false, fmt.Errorf("reading DT_RUNPATH of %s: %w", p, err)
	}
	for _, s := range rp {
		info.rpath = append(info.rpath, filepath.SplitList(s)...)
	}
	for _, s := range rn {
		info.run = append(info.run, filepath.SplitList(s)...)
	}
	return info, true, nil
}

func dynProg(f *elf.File) *elf.Prog {
	for _, p := range f.Progs {
		if p.Type == elf.PT_DYNAMIC {
			return p
		}
	}
	return nil
}

// rootOf returns the root among r.Roots that contains p (the longest), or "/".
func (r *Resolver) rootOf(p string) string {
	best := "/"
	for _, root := range r.roots() {
		root = filepath.Clean(root)
		if root == "/" {
			continue
		}
		if (p == root || strings.HasPrefix(p, root+"/")) && len(root) > len(best) {
			best = root
		}
	}
	return best
}

// Closure returns every library the files need, transitively, sorted by
// soname, and the program interpreter (PT_INTERP of the first file that has
// one) resolved under the roots. Non-ELF files and ELF files of another
// machine or class are skipped.
func (r *Resolver) Closure(files []string) (libs []Lib, interp string, err error) {
	found := map[string]Lib{}
	seen := map[string]bool{} // host paths already scanned
	type item struct {
		path   string
		parent []string // DT_RPATH dirs inherited from the loading chain (expanded)
	}
	var queue []item
	for _, f := range files {
		abs, err := filepath.Abs(f)
		if err != nil {
			return nil, "", fmt.Errorf("resolving %s: %w", f, err)
		}
		queue = append(queue, item{path: abs})
	}
	sort.Slice(queue, func(i, j int) bool { return queue[i].path < queue[j].path })
	for len(queue) > 0 {
		it := queue[0]
		queue = queue[1:]
		if seen[it.path] {
			continue
		}
		seen[it.path] = true
		info, ok, err := readELF(it.path)
		if err != nil {
			return nil, "", err
		}
		if !ok {
			continue
		}
		root := r.rootOf(it.path)
		if info.interp != "" && interp == "" {
			p, ok := r.findIn(r.roots(), info.interp)
			if !ok {
				return nil, "", fmt.Errorf("program interpreter %s of %s not found under %v", info.interp, it.path, r.roots())
			}
			interp = p
		}
		expand := func(dirs []string) []string {
			var out []string
			for _, d := range dirs {
				if strings.Contains(d, "$ORIGIN") || strings.Contains(d, "${ORIGIN}") {
					origin := filepath.Dir(it.path)
					d = strings.ReplaceAll(strings.ReplaceAll(d, "${ORIGIN}", origin), "$ORIGIN", origin)
					out = append(out, "origin:"+filepath.Clean(d))
					continue
				}
				if path.IsAbs(d) {
					out = append(out, d)
				}
			}
			return out
		}
		var search []string
		var chain []string
		if len(info.run) == 0 {
			chain = append(expand(info.rpath), it.parent...)
			search = chain
		} else {
			search = expand(info.run)
		}
		for _, so := range info.needed {
			if _, done := found[so]; done {
				continue
			}
			lib, ok, err := r.find(so, search, root)
			if err != nil {
				return nil, "", err
			}
			if !ok {
				return nil, "", &MissingError{Soname: so, File: it.path}
			}
			r.log().Debug("resolved library", "soname", so, "path", lib.Path, "needed_by", it.path)
			found[so] = lib
			queue = append(queue, item{path: lib.Path, parent: chain})
		}
	}
	for _, l := range found {
		libs = append(libs, l)
	}
	sort.Slice(libs, func(i, j int) bool { return libs[i].Soname < libs[j].Soname })
	return libs, interp, nil
}

// find searches for soname: the object's RPATH/RUNPATH, then for each root
// the ld.so.conf dirs, the default dirs and the alternatives subdirectories.
func (r *Resolver) find(soname string, search []string, fileRoot string) (Lib, bool, error) {
	if strings.Contains(soname, "/") {
		if p, ok := r.findIn([]string{fileRoot}, soname); ok {
			return Lib{Soname: path.Base(soname), Path: p}, true, nil
		}
		return Lib{}, false, nil
	}
	for _, d := range search {
		if o, ok := strings.CutPrefix(d, "origin:"); ok {
			if p, ok := resolveHost(filepath.Join(o, soname)); ok {
				return Lib{Soname: soname, Path: p}, true, nil
			}
			continue
		}
		if p, ok := r.findIn(r.roots(), path.Join(d, soname)); ok {
			return Lib{Soname: soname, Path: p}, true, nil
		}
	}
	for _, root := range r.roots() {
		dirs, err := r.ldSoConf(root)
		if err != nil {
			return Lib{}, false, err
		}
		dirs = append(dirs, defaultDirs...)
		for _, d := range dirs {
			if p, ok := r.findIn([]string{root}, path.Join(d, soname)); ok {
				return Lib{Soname: soname, Path: p}, true, nil
			}
		}
		for _, d := range alternativesDirs {
			ents, err := os.ReadDir(filepath.Join(root, d))
			if err != nil {
				continue
			}
			for _, e := range ents { // sorted by name
				if !e.IsDir() {
					continue
				}
				if p, ok := r.findIn([]string{root}, path.Join(d, e.Name(), soname)); ok {
					return Lib{Soname: soname, Path: p}, true, nil
				}
			}
		}
	}
	return Lib{}, false, nil
}

// findIn resolves the guest path p under each root in order and returns the
// first that exists as a usable ELF file of the right class.
func (r *Resolver) findIn(roots []string, p string) (string, bool) {
	for _, root := range roots {
		hp, ok := ResolveIn(root, p)
		if !ok {
			continue
		}
		if _, usable, err := readELF(hp); err != nil || !usable {
			continue
		}
		return hp, true
	}
	return "", false
}

func resolveHost(p string) (string, bool) {
	hp, err := filepath.EvalSymlinks(p)
	if err != nil {
		return "", false
	}
	if _, usable, err := readELF(hp); err != nil || !usable {
		return "", false
	}
	return hp, true
}

// ResolveIn resolves the absolute guest path p inside root as if root were
// chrooted: absolute symlink targets stay inside root. It returns the host
// path of an existing regular file.
func ResolveIn(root, p string) (string, bool) {
	root = filepath.Clean(root)
	if root == "/" {
		hp, err := filepath.EvalSymlinks(p)
		if err != nil {
			return "", false
		}
		st, err := os.Stat(hp)
		if err != nil || !st.Mode().IsRegular() {
			return "", false
		}
		return hp, true
	}
	parts := strings.Split(strings.TrimPrefix(path.Clean("/"+p), "/"), "/")
	cur := "/" // guest path resolved so far
	for hops := 0; len(parts) > 0; {
		name := parts[0]
		parts = parts[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, name)
		st, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if st.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		hops++
		if hops > 40 {
			return "", false
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		parts = append(strings.Split(target, "/"), parts...)
	}
	hp := filepath.Join(root, cur)
	st, err := os.Stat(hp)
	if err != nil || !st.Mode().IsRegular() {
		return "", false
	}
	return hp, true
}

// ldSoConf returns the directories listed in root's /etc/ld.so.conf and its includes.
func (r *Resolver) ldSoConf(root string) ([]string, error) {
	if dirs, ok := r.confDirs[root]; ok {
		return dirs, nil
	}
	if r.confDirs == nil {
		r.confDirs = map[string][]string{}
	}
	var dirs []string
	seen := map[string]bool{}
	var parse func(guest string, depth int) error
	parse = func(guest string, depth int) error {
		if depth > 10 || seen[guest] {
			return nil
		}
		seen[guest] = true
		hp, ok := ResolveIn(root, guest)
		if !ok {
			return nil
		}
		f, err := os.Open(hp)
		if err != nil {
			return fmt.Errorf("reading %s: %w", hp, err)
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := sc.Text()
			if i := strings.IndexByte(line, '#'); i >= 0 {
				line = line[:i]
			}
			line = strings.TrimSpace(line)
			if line == "" {
				continue
			}
			if pat, ok := strings.CutPrefix(line, "include"); ok && (strings.HasPrefix(pat, " ") || strings.HasPrefix(pat, "\t")) {
				for _, g := range strings.Fields(pat) {
					if !path.IsAbs(g) {
						g = path.Join(path.Dir(guest), g)
					}
					matches, err := filepath.Glob(filepath.Join(root, g))
					if err != nil {
						continue
					}
					sort.Strings(matches)
					for _, m := range matches {
						rel, err := filepath.Rel(root, m)
						if err != nil {
							continue
						}
						if err := parse("/"+filepath.ToSlash(rel), depth+1); err != nil {
							return err
						}
					}
				}
				continue
			}
			if strings.HasPrefix(line, "hwcap") {
				continue
			}
			for _, d := range strings.FieldsFunc(line, func(c rune) bool { return c == ':' || c == ',' || c == ' ' || c == '\t' }) {
				if path.IsAbs(d) {
					dirs = append(dirs, path.Clean(d))
				}
			}
		}
		return sc.Err()
	}
	if err := parse("/etc/ld.so.conf", 0); err != nil {
		return nil, err
	}
	r.confDirs[root] = dirs
	return dirs, nil
}
