package image

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/kiln-dev/kiln/internal/cache"

	"github.com/google/renameio/v2"
)

// verifyHook, when set (by tests), is called for every part Verify hashes.
var verifyHook func(part string)

// Verify hashes every part and compares it with the index. Success is
// remembered in the cache (keyed by path, inode, size, mtime, ctime and
// digest), so verifying an unchanged file again returns at once. A mismatch
// yields an error wrapping ErrCorrupt that names the part.
func (img *Image) Verify() error {
	f, err := os.Open(img.Path)
	if err != nil {
		return fmt.Errorf("verifying image: %w", err)
	}
	defer f.Close()
	before, err := f.Stat()
	if err != nil {
		return fmt.Errorf("verifying image: %w", err)
	}
	if before.Size() != img.Size {
		return corrupt(img.Path, "file changed since it was opened (%d bytes, was %d)", before.Size(), img.Size)
	}
	stamp := ""
	if key, ok := stampKey(img, before); ok {
		if dir, err := cache.Sub("verified"); err == nil {
			stamp = filepath.Join(dir, key)
			if _, err := os.Stat(stamp); err == nil {
				return nil
			}
		}
	}
	for _, p := range img.Parts {
		if verifyHook != nil {
			verifyHook(p.Name)
		}
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, p.Offset, p.Size)); err != nil {
			return &imageError{msg: fmt.Sprintf("%s: reading part %s: %v", img.Path, p.Name, err), err: err}
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != p.SHA256 {
			return corrupt(img.Path, "part %s sha256 mismatch (file damaged), rebuild it with kiln build", p.Name)
		}
	}
	after, err := f.Stat()
	if stamp != "" && err == nil && sameFile(before, after) {
		writeStamp(stamp, img.Digest) // best effort: a missing stamp only costs time
	}
	return nil
}

func stampKey(img *Image, fi fs.FileInfo) (string, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return "", false
	}
	s := fmt.Sprintf("%s|%d|%d|%d|%d|%s", img.Path, st.Ino, fi.Size(),
		st.Mtim.Nano(), st.Ctim.Nano(), img.Digest)
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:]), true
}

func sameFile(a, b fs.FileInfo) bool {
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Ino == sb.Ino && a.Size() == b.Size() &&
		sa.Mtim == sb.Mtim && sa.Ctim == sb.Ctim
}

func writeStamp(path, content string) {
	_ = renameio.WriteFile(path, []byte(content+"\n"), 0o644, renameio.WithTempDir(filepath.Dir(path)), renameio.WithStaticPermissions(0o644))
}

// Extract copies a part's bytes to dst atomically (temporary file + rename),
// checking them against the part's sha256 on the way.
func (img *Image) Extract(name, dst string) error { return img.extract(name, dst, -1) }

// extract writes part name to dst atomically: its bytes as they are
// (gunzipped < 0), checked against the part's sha256 as they are copied,
// or, once the digest is checked, gzip-decoded to exactly gunzipped bytes.
func (img *Image) extract(name, dst string, gunzipped int64) error {
	p, ok := img.Part(name)
	if !ok {
		return fmt.Errorf("extracting %s: image has no such part", name)
	}
	f, err := os.Open(img.Path)
	if err != nil {
		return fmt.Errorf("extracting %s: %w", name, err)
	}
	defer f.Close()
	tmp, err := renameio.NewPendingFile(dst, renameio.WithTempDir(filepath.Dir(dst)), renameio.WithStaticPermissions(0o644))
	if err != nil {
		return fmt.Errorf("extracting %s: %w", name, err)
	}
	defer tmp.Cleanup()
	h := sha256.New()
	var to io.Writer = h
	if gunzipped < 0 {
		to = io.MultiWriter(tmp, h) // one pass: copy and hash
	}
	n, err := io.Copy(to, io.NewSectionReader(f, p.Offset, p.Size))
	if err != nil {
		return fmt.Errorf("extracting %s: %w", name, err)
	}
	if n != p.Size {
		return corrupt(img.Path, "image truncated: part %s has %d of %d bytes, rebuild it with kiln build", name, n, p.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != p.SHA256 {
		return corrupt(img.Path, "part %s sha256 mismatch (file damaged), rebuild it with kiln build", name)
	}
	if gunzipped >= 0 {
		zr, err := gzip.NewReader(io.NewSectionReader(f, p.Offset, p.Size))
		if err != nil {
			return corrupt(img.Path, "part %s is not gzip data: %v; rebuild it with kiln build", name, err)
		}
		n, err := io.Copy(tmp, io.LimitReader(zr, gunzipped+1))
		if err != nil {
			return corrupt(img.Path, "decoding part %s: %v; rebuild it with kiln build", name, err)
		}
		if n != gunzipped {
			return corrupt(img.Path, "part %s decodes to %d bytes, the manifest says %d; rebuild it with kiln build", name, n, gunzipped)
		}
	}
	if err := tmp.CloseAtomicallyReplace(); err != nil {
		return fmt.Errorf("extracting %s: %w", name, err)
	}
	return nil
}

// BootFiles returns the paths of the image's kernel and initramfs, extracting
// them once into <cache>/boot/<digest>/.
func (img *Image) BootFiles() (kernel, initramfs string, err error) {
	boot, err := cache.Sub("boot")
	if err != nil {
		return "", "", err
	}
	dir := filepath.Join(boot, img.Digest)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", "", fmt.Errorf("creating boot cache: %w", err)
	}
	paths := [2]string{filepath.Join(dir, PartKernel), filepath.Join(dir, PartInitramfs)}
	for i, name := range []string{PartKernel, PartInitramfs} {
		p, ok := img.Part(name)
		if !ok {
			return "", "", corrupt(img.Path, "no %s part", name)
		}
		want, gz := p.Size, false
		if name == PartKernel && img.Manifest != nil && img.Manifest.Kernel.Encoding != "" {
			if img.Manifest.Kernel.Encoding != KernelGzip {
				return "", "", corrupt(img.Path, "unknown kernel encoding %q (a newer kiln built it?)", img.Manifest.Kernel.Encoding)
			}
			want, gz = img.Manifest.Kernel.Size, true
		}
		if fi, err := os.Stat(paths[i]); err == nil && fi.Mode().IsRegular() && fi.Size() == want {
			continue
		} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", "", fmt.Errorf("checking boot cache: %w", err)
		}
		var err error
		if gz {
			err = img.extract(name, paths[i], want)
		} else {
			err = img.Extract(name, paths[i])
		}
		if err != nil {
			return "", "", err
		}
	}
	return paths[0], paths[1], nil
}

// OpenVerified opens the image at path and verifies every part's digest:
// what a caller does once before booting it.
func OpenVerified(path string) (*Image, error) {
	img, err := Open(path)
	if err != nil {
		return nil, err
	}
	if err := img.Verify(); err != nil {
		return nil, err
	}
	return img, nil
}
