package kernel

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// deps returns the module dependency map of k: modules.dep when present,
// else derived from the modules' .modinfo sections.
func (k *Kernel) deps() (map[string][]string, error) {
	f, err := os.Open(filepath.Join(k.ModulesDir, "modules.dep"))
	if errors.Is(err, os.ErrNotExist) {
		return DepsFromModinfo(k.ModulesDir)
	}
	if err != nil {
		return nil, fmt.Errorf("reading module list: %w", err)
	}
	defer f.Close()
	return ParseModulesDep(f)
}

// ParseModinfo parses the contents of a module's .modinfo ELF section
// (NUL-separated key=value strings) into the module name and its direct
// dependencies.
func ParseModinfo(b []byte) (name string, depends []string) {
	for _, kv := range bytes.Split(b, []byte{0}) {
		k, v, ok := bytes.Cut(kv, []byte("="))
		if !ok {
			continue
		}
		switch string(k) {
		case "name":
			name = string(v)
		case "depends":
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					depends = append(depends, strings.ReplaceAll(d, "-", "_"))
				}
			}
		}
	}
	return name, depends
}

// DepsFromModinfo walks modulesDir and builds the modules.dep map (module
// path relative to modulesDir => direct dependency paths) from each plain
// .ko file's .modinfo section, the way depmod would.
func DepsFromModinfo(modulesDir string) (map[string][]string, error) {
	type mod struct {
		path    string
		depends []string
	}
	var mods []mod
	byName := map[string]string{}
	err := filepath.WalkDir(modulesDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(p, ".ko") {
			return nil
		}
		rel, err := filepath.Rel(modulesDir, p)
		if err != nil {
			return err
		}
		ef, err := elf.Open(p)
		if err != nil {
			return fmt.Errorf("reading module %s: %w", rel, err)
		}
		defer ef.Close()
		sec := ef.Section(".modinfo")
		if sec == nil {
			return fmt.Errorf("module %s has no .modinfo section", rel)
		}
		data, err := sec.Data()
		if err != nil {
			return fmt.Errorf("reading module %s: %w", rel, err)
		}
		name, depends := ParseModinfo(data)
		if name == "" {
			name = ModuleName(rel)
		}
		byName[strings.ReplaceAll(name, "-", "_")] = rel
		mods = append(mods, mod{rel, depends})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scanning modules in %s: %w", modulesDir, err)
	}
	deps := make(map[string][]string, len(mods))
	for _, m := range mods {
		ds := []string{}
		for _, d := range m.depends {
			p, ok := byName[d]
			if !ok {
				return nil, fmt.Errorf("module %s depends on %s, which is not in %s", m.path, d, modulesDir)
			}
			ds = append(ds, p)
		}
		deps[m.path] = ds
	}
	return deps, nil
}

// writeModulesDep writes deps in modules.dep format, sorted by path.
func writeModulesDep(path string, deps map[string][]string) error {
	keys := make([]string, 0, len(deps))
	for k := range deps {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k)
		b.WriteString(":")
		for _, d := range deps[k] {
			b.WriteString(" ")
			b.WriteString(d)
		}
		b.WriteString("\n")
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing modules.dep: %w", err)
	}
	return nil
}
