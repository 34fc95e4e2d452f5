// Package spec parses and validates kiln.toml, the declarative description of a kiln image.
package spec

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/kiln-dev/kiln/internal/size"
)

// FileName is the spec file looked up when Load is given a directory.
const FileName = "kiln.toml"

// Defaults applied by Parse.
const (
	DefaultMemory      = "512M"
	DefaultVCPUs       = 1
	DefaultCompression = "lz4hc"
	// DefaultKernel is kiln's own kernel: built once per machine, it boots
	// in a fraction of the time of Debian's (docs/design.md, "Kernels").
	DefaultKernel = "minimal"
	// DebianPython is Debian's own interpreter, the default when Debian packages are used.
	DebianPython = "/usr/bin/python3"
	// PathPython is the default interpreter otherwise, resolved on PATH by the builder.
	PathPython = "python3"
)

// Limits enforced by Validate.
const (
	MinMemoryMiB = 128
	MaxMemoryMiB = 1 << 20 // 1 TiB
	MaxVCPUs     = 64
)

// Spec is a parsed kiln.toml.
type Spec struct {
	Name             string            `toml:"name" json:"name"`
	Python           string            `toml:"python" json:"python,omitempty"`
	Debian           []string          `toml:"debian" json:"debian,omitempty"`
	Requirements     []string          `toml:"-" json:"requirements,omitempty"`
	RequirementsFile string            `toml:"-" json:"requirements_file,omitempty"`
	PipArgs          []string          `toml:"pip_args" json:"pip_args,omitempty"`
	Files            map[string]string `toml:"files" json:"files,omitempty"`
	Env              map[string]string `toml:"env" json:"env,omitempty"`
	Command          []string          `toml:"command" json:"command,omitempty"`
	Memory           string            `toml:"memory" json:"memory"`
	VCPUs            int               `toml:"vcpus" json:"vcpus"`
	Preload          []string          `toml:"preload" json:"preload,omitempty"`
	Keep             []string          `toml:"keep" json:"keep,omitempty"`
	Compression      string            `toml:"compression" json:"compression,omitempty"`
	Kernel           string            `toml:"kernel" json:"kernel,omitempty"`
	Dir              string            `toml:"-" json:"-"`
}

// KeepNames are the names that the builder prunes unless listed in Spec.Keep.
var KeepNames = []string{"tests", "test", "idlelib", "tkinter", "ensurepip", "config", "pydoc_data", "lib2to3"}

// Compressions are the accepted values of Spec.Compression.
var Compressions = []string{"none", "lz4", "lz4hc"}

// Kernels are the accepted values of Spec.Kernel: kiln's own module-less
// kernel, or Debian's cloud kernel with its modules.
var Kernels = []string{"minimal", "debian"}

// Error is one problem in a spec. File and Line are set when the problem
// could be located in the source text.
type Error struct {
	File string
	Line int
	Key  string // top-level key the problem belongs to, if any
	Msg  string
}

func (e *Error) Error() string {
	switch {
	case e.File != "" && e.Line > 0:
		return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Msg)
	case e.File != "":
		return e.File + ": " + e.Msg
	case e.Line > 0:
		return fmt.Sprintf("line %d: %s", e.Line, e.Msg)
	}
	return e.Msg
}

// rawSpec mirrors the TOML document; pointers distinguish "absent" from zero.
type rawSpec struct {
	Name         string            `toml:"name"`
	Python       string            `toml:"python"`
	Debian       []string          `toml:"debian"`
	Requirements any               `toml:"requirements"`
	PipArgs      []string          `toml:"pip_args"`
	Files        map[string]string `toml:"files"`
	Env          map[string]string `toml:"env"`
	Command      []string          `toml:"command"`
	Memory       *string           `toml:"memory"`
	VCPUs        *int              `toml:"vcpus"`
	Preload      []string          `toml:"preload"`
	Keep         []string          `toml:"keep"`
	Compression  *string           `toml:"compression"`
	Kernel       *string           `toml:"kernel"`
}

var knownKeys = []string{"name", "python", "debian", "requirements", "pip_args", "files", "env",
	"command", "memory", "vcpus", "preload", "keep", "compression", "kernel"}

// Load reads and parses a spec. path is a directory holding kiln.toml, the
// spec file itself, or "" for the current directory. Requirement files and
// file sources named by the spec must exist.
func Load(p string) (*Spec, error) {
	if p == "" {
		p = "."
	}
	file := p
	if fi, err := os.Stat(p); err == nil && fi.IsDir() {
		file = filepath.Join(p, FileName)
	}
	data, err := os.ReadFile(file)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("no spec at %s (create a %s, see docs/spec.md): %w", file, FileName, err)
		}
		return nil, fmt.Errorf("reading spec: %w", err)
	}
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("resolving spec path: %w", err)
	}
	s, err := Parse(data, file, filepath.Dir(abs))
	if err != nil {
		return nil, err
	}
	loc := locate(data)
	var errs []error
	if s.RequirementsFile != "" {
		if _, err := os.Stat(s.RequirementsFile); err != nil {
			errs = append(errs, loc.at(file, "requirements", "", fmt.Sprintf("key \"requirements\": requirements file %s: %v", s.RequirementsFile, errors.Unwrap(err))))
		}
	}
	for _, src := range sortedKeys(s.Files) {
		if _, err := os.Stat(filepath.Join(s.Dir, src)); err != nil {
			errs = append(errs, loc.at(file, "files", src, fmt.Sprintf("key \"files\": source %q: %v", src, err)))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

// Parse decodes a kiln.toml document, applies defaults and validates it.
// filename is used in error messages; dir is the directory relative paths are
// resolved against ("" means the current directory).
func Parse(data []byte, filename, dir string) (*Spec, error) {
	if filename == "" {
		filename = FileName
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("resolving spec directory: %w", err)
	}
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var raw rawSpec
	if err := dec.Decode(&raw); err != nil {
		return nil, decodeError(err, filename, data)
	}
	loc := locate(data)

	s := &Spec{
		Name:        raw.Name,
		Python:      raw.Python,
		Debian:      raw.Debian,
		PipArgs:     raw.PipArgs,
		Files:       raw.Files,
		Env:         raw.Env,
		Command:     raw.Command,
		Memory:      DefaultMemory,
		VCPUs:       DefaultVCPUs,
		Preload:     raw.Preload,
		Keep:        raw.Keep,
		Compression: DefaultCompression,
		Kernel:      DefaultKernel,
		Dir:         absDir,
	}
	if s.Python == "" {
		s.Python = PathPython
		if len(s.Debian) > 0 {
			s.Python = DebianPython
		}
	}
	if raw.Memory != nil {
		s.Memory = *raw.Memory
	}
	if raw.VCPUs != nil {
		s.VCPUs = *raw.VCPUs
	}
	if raw.Compression != nil {
		s.Compression = *raw.Compression
	}
	if raw.Kernel != nil {
		s.Kernel = *raw.Kernel
	}
	switch r := raw.Requirements.(type) {
	case nil:
	case string:
		if r == "" {
			return nil, loc.at(filename, "requirements", "", `key "requirements": expected a requirements file path or an array of strings, got an empty string`)
		}
		if filepath.IsAbs(r) {
			s.RequirementsFile = filepath.Clean(r)
		} else {
			s.RequirementsFile = filepath.Join(absDir, r)
		}
	case []any:
		for i, v := range r {
			str, ok := v.(string)
			if !ok {
				return nil, loc.at(filename, "requirements", "", fmt.Sprintf("key \"requirements\": element %d: expected string, got %s", i, tomlTypeOf(v)))
			}
			s.Requirements = append(s.Requirements, str)
		}
	default:
		return nil, loc.at(filename, "requirements", "", fmt.Sprintf("key \"requirements\": expected array of strings or a requirements file path, got %s", tomlTypeOf(r)))
	}

	if errs := s.validate(); len(errs) > 0 {
		located := make([]*Error, len(errs))
		for i, e := range errs {
			located[i] = loc.at(filename, e.key, e.sub, e.msg)
		}
		slices.SortStableFunc(located, func(a, b *Error) int { return a.Line - b.Line })
		out := make([]error, len(located))
		for i, e := range located {
			out[i] = e
		}
		return nil, errors.Join(out...)
	}
	return s, nil
}

type problem struct {
	key, sub, msg string
}

var (
	nameRE    = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]*$`)
	debianRE  = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+$`)
	envKeyRE  = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	preloadRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$`)
)

// Validate checks every field of an already defaulted spec and returns all
// problems found, joined.
func (s *Spec) Validate() error {
	errs := s.validate()
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = &Error{Key: e.key, Msg: e.msg}
	}
	return errors.Join(out...)
}

func (s *Spec) validate() []problem {
	var ps []problem
	add := func(key, sub, format string, args ...any) {
		ps = append(ps, problem{key, sub, fmt.Sprintf("key %q: ", key) + fmt.Sprintf(format, args...)})
	}
	switch {
	case s.Name == "":
		ps = append(ps, problem{"", "", `missing required key "name" (add name = "my-image")`})
	case len(s.Name) > 128:
		add("name", "", "%q is longer than 128 characters", s.Name[:20]+"…")
	case !nameRE.MatchString(s.Name):
		add("name", "", "%q must start with a letter or digit and contain only letters, digits, '_', '.', '-'", s.Name)
	}
	if s.Python == "" {
		add("python", "", "must not be empty")
	} else if strings.ContainsRune(s.Python, 0) {
		add("python", "", "must not contain NUL")
	}
	for _, d := range s.Debian {
		if !debianRE.MatchString(d) {
			add("debian", "", "%q is not a valid Debian package name", d)
		}
	}
	for _, r := range s.Requirements {
		if strings.TrimSpace(r) == "" || strings.ContainsAny(r, "\x00\r\n") {
			add("requirements", "", "%q is not a valid requirement (one requirement per string)", r)
		}
	}
	if s.RequirementsFile != "" && !filepath.IsAbs(s.RequirementsFile) {
		add("requirements", "", "requirements file %q must be an absolute path", s.RequirementsFile)
	}
	for _, a := range s.PipArgs {
		if strings.ContainsRune(a, 0) {
			add("pip_args", "", "%q contains NUL", a)
		}
	}
	for _, src := range sortedKeys(s.Files) {
		dst := s.Files[src]
		switch {
		case src == "" || strings.ContainsRune(src, 0):
			add("files", src, "source %q is not a valid path", src)
		case filepath.IsAbs(src) || !filepath.IsLocal(filepath.Clean(src)):
			add("files", src, "source %q must be a path relative to the spec directory, inside it", src)
		}
		switch {
		case !path.IsAbs(dst) || strings.ContainsRune(dst, 0):
			add("files", src, "destination %q for %q must be an absolute guest path", dst, src)
		case slices.Contains(strings.Split(dst, "/"), ".."):
			add("files", src, "destination %q for %q must not contain \"..\"", dst, src)
		}
	}
	for _, k := range sortedKeys(s.Env) {
		if !envKeyRE.MatchString(k) {
			add("env", k, "%q is not a valid environment variable name", k)
		}
		if strings.ContainsRune(s.Env[k], 0) {
			add("env", k, "value of %q contains NUL", k)
		}
	}
	if len(s.Command) > 0 && s.Command[0] == "" {
		add("command", "", "the program (first element) must not be empty")
	}
	for _, a := range s.Command {
		if strings.ContainsRune(a, 0) {
			add("command", "", "%q contains NUL", a)
		}
	}
	if n, err := size.Parse(s.Memory); err != nil {
		add("memory", "", "%v", err)
	} else if n < MinMemoryMiB<<20 {
		add("memory", "", "%q is below the minimum of %dM", s.Memory, MinMemoryMiB)
	} else if n > MaxMemoryMiB<<20 {
		add("memory", "", "%q is above the maximum of %dM", s.Memory, MaxMemoryMiB)
	}
	if s.VCPUs < 1 || s.VCPUs > MaxVCPUs {
		add("vcpus", "", "must be between 1 and %d, got %d", MaxVCPUs, s.VCPUs)
	}
	for _, p := range s.Preload {
		if !preloadRE.MatchString(p) {
			add("preload", "", "%q is not a Python module name (like \"numpy\" or \"scipy.linalg\")", p)
		}
	}
	for _, k := range s.Keep {
		if !slices.Contains(KeepNames, k) {
			add("keep", "", "%q is not one of %s", k, strings.Join(KeepNames, ", "))
		}
	}
	if !slices.Contains(Compressions, s.Compression) {
		add("compression", "", "%q is not one of %s", s.Compression, strings.Join(Compressions, ", "))
	}
	if s.Kernel != "" && !slices.Contains(Kernels, s.Kernel) { // "": DefaultKernel
		add("kernel", "", "%q is not one of %s", s.Kernel, strings.Join(Kernels, ", "))
	}
	return ps
}

// MemoryMiB returns the guest memory in MiB (rounded down). Valid after Validate.
func (s *Spec) MemoryMiB() int {
	n, err := size.Parse(s.Memory)
	if err != nil {
		return 0
	}
	return int(n >> 20)
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

var typeMismatchRE = regexp.MustCompile(`cannot decode TOML (.+?) into .* of type (\S+)$`)

// decodeError turns a go-toml error into *Error values naming key and line.
func decodeError(err error, filename string, data []byte) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) {
		var errs []error
		for i := range strict.Errors {
			de := &strict.Errors[i]
			row, _ := de.Position()
			key := strings.Join(de.Key(), ".")
			msg := fmt.Sprintf("unknown key %q", key)
			if s := suggest(key); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			} else {
				msg += " (known keys: " + strings.Join(knownKeys, ", ") + ")"
			}
			errs = append(errs, &Error{File: filename, Line: row, Key: firstKey(de.Key()), Msg: msg})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		text := strings.TrimPrefix(de.Error(), "toml: ")
		key := de.Key()
		if len(key) == 0 {
			return &Error{File: filename, Line: row, Msg: "syntax error: " + text}
		}
		name := strings.Join(key, ".")
		if m := typeMismatchRE.FindStringSubmatch(text); m != nil {
			text = fmt.Sprintf("expected %s, got %s", tomlTypeName(m[2]), m[1])
		}
		return &Error{File: filename, Line: row, Key: key[0], Msg: fmt.Sprintf("key %q: %s", name, text)}
	}
	return &Error{File: filename, Msg: err.Error()}
}

func firstKey(k toml.Key) string {
	if len(k) == 0 {
		return ""
	}
	return k[0]
}

func tomlTypeName(goType string) string {
	switch strings.TrimPrefix(goType, "*") {
	case "int", "int64":
		return "integer"
	case "string":
		return "string"
	case "[]string":
		return "array of strings"
	case "map[string]string":
		return "table of strings"
	}
	return goType
}

func tomlTypeOf(v any) string {
	switch v.(type) {
	case string:
		return "string"
	case int64:
		return "integer"
	case float64:
		return "float"
	case bool:
		return "boolean"
	case []any:
		return "array"
	case map[string]any:
		return "table"
	}
	return "datetime"
}

// suggest returns the known key closest to k, if it is a likely typo.
func suggest(k string) string {
	best, bestD := "", 3
	for _, c := range knownKeys {
		if d := editDistance(strings.ToLower(k), c); d < bestD {
			best, bestD = c, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 1 << 30
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
