// Package initramfs writes reproducible newc cpio archives holding kiln-init and, for a kernel with modules, its modules.
package initramfs

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/kiln-dev/kiln/internal/build/kernel"
	"github.com/kiln-dev/kiln/internal/guest/proto"
)

// modulesList is proto.ModulesList as an archive name (no leading slash).
var modulesList = strings.TrimPrefix(proto.ModulesList, "/")

// File is one entry of an initramfs.
type File struct {
	Name   string      // path inside the archive, no leading slash
	Mode   fs.FileMode // type and permission bits
	Data   []byte      // contents of a regular file
	Source string      // host file to read contents from when Data is nil
	Link   string      // symlink target when Mode&fs.ModeSymlink != 0
}

// Write writes files as a newc cpio archive with a trailer. Missing parent
// directories are added (0755); entries are sorted by name; owners, times
// and inode numbers are fixed, so equal input gives equal bytes.
func Write(w io.Writer, files []File) error {
	byName := make(map[string]File, len(files))
	for _, f := range files {
		name, err := cleanName(f.Name)
		if err != nil {
			return err
		}
		if _, dup := byName[name]; dup {
			return fmt.Errorf("initramfs: duplicate entry %q", name)
		}
		f.Name = name
		byName[name] = f
	}
	for name := range byName {
		for dir := path.Dir(name); dir != "."; dir = path.Dir(dir) {
			if f, ok := byName[dir]; ok {
				if !f.Mode.IsDir() {
					return fmt.Errorf("initramfs: %q is not a directory but contains %q", dir, name)
				}
				continue
			}
			byName[dir] = File{Name: dir, Mode: fs.ModeDir | 0o755}
		}
	}
	names := make([]string, 0, len(byName))
	for name := range byName {
		names = append(names, name)
	}
	// Parents sort before their children since a parent is a prefix.
	sort.Strings(names)

	rw := cpio.Newc.Writer(w)
	for i, name := range names {
		rec, err := record(byName[name])
		if err != nil {
			return err
		}
		rec = cpio.MakeReproducible(rec)
		rec.Ino = uint64(i + 1)
		rec.NLink = 1
		if err := rw.WriteRecord(rec); err != nil {
			return fmt.Errorf("initramfs: writing %s: %w", name, err)
		}
	}
	if err := cpio.WriteTrailer(rw); err != nil {
		return fmt.Errorf("initramfs: writing trailer: %w", err)
	}
	return nil
}

func cleanName(name string) (string, error) {
	c := path.Clean(strings.TrimPrefix(name, "/"))
	if name == "" || c == "." || c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("initramfs: invalid entry name %q", name)
	}
	return c, nil
}

func record(f File) (cpio.Record, error) {
	perm := uint64(f.Mode.Perm())
	if f.Mode&fs.ModeSetuid != 0 {
		perm |= 0o4000
	}
	if f.Mode&fs.ModeSetgid != 0 {
		perm |= 0o2000
	}
	if f.Mode&fs.ModeSticky != 0 {
		perm |= 0o1000
	}
	switch {
	case f.Mode.IsDir():
		return cpio.Directory(f.Name, perm), nil
	case f.Mode&fs.ModeSymlink != 0:
		if f.Link == "" {
			return cpio.Record{}, fmt.Errorf("initramfs: symlink %s has no target", f.Name)
		}
		return cpio.Symlink(f.Name, f.Link), nil
	case f.Mode.IsRegular():
		data := f.Data
		if data == nil && f.Source != "" {
			var err error
			if data, err = os.ReadFile(f.Source); err != nil {
				return cpio.Record{}, fmt.Errorf("initramfs: reading %s for %s: %w", f.Source, f.Name, err)
			}
		}
		return cpio.StaticRecord(data, cpio.Info{Name: f.Name, Mode: cpio.S_IFREG | perm}), nil
	default:
		return cpio.Record{}, fmt.Errorf("initramfs: %s has unsupported file type %v", f.Name, f.Mode.Type())
	}
}

// ForInit returns the initramfs contents for kiln-init: the init binary at
// /init, each module at /lib/modules/<NN>-<name>.ko, and /etc/kiln/modules
// listing the module paths in load order. A kernel without modules gets
// kiln-init alone (kiln-init loads nothing when the list is absent).
func ForInit(initBinary string, modules []kernel.Module) []File {
	files := []File{{Name: "init", Mode: 0o755, Source: initBinary}}
	if len(modules) == 0 {
		return files
	}
	var list strings.Builder
	for i, m := range modules {
		name := fmt.Sprintf("lib/modules/%02d-%s.ko", i, m.Name)
		files = append(files, File{Name: name, Mode: 0o644, Source: m.Path})
		list.WriteString("/" + name + "\n")
	}
	files = append(files, File{Name: modulesList, Mode: 0o644, Data: []byte(list.String())})
	return files
}
