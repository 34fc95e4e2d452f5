package endpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kiln-dev/kiln/internal/image"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

// ErrUnknownImage is returned for an image reference that names no image
// file in the images directory.
var ErrUnknownImage = errors.New("unknown image")

// images resolves image references (names or paths inside the images
// directory) to opened images, caching by file identity.
type images struct {
	dir   string
	mu    sync.Mutex
	cache map[string]imgEntry // by path
}

type imgEntry struct {
	size     int64
	mtime    time.Time
	info     apitype.ImageInfo
	img      *image.Image
	verified bool // img's parts were hashed (image.Verify)
}

func newImages(dir string) *images { return &images{dir: dir, cache: map[string]imgEntry{}} }

// resolve maps ref to a file: a name (with or without the .kimg suffix) or
// a relative path inside the images directory, or an absolute path that
// lies inside it. Symlinks placed in the directory are followed.
func (im *images) resolve(ref string) (string, error) {
	if ref == "" {
		return "", fmt.Errorf("%w: no image given (set \"image\" to a name from GET /v1/images)", ErrUnknownImage)
	}
	if im.dir == "" {
		return "", fmt.Errorf("%w %q: the endpoint has no images directory (start kiln serve with --images DIR)", ErrUnknownImage, ref)
	}
	rel := ref
	if filepath.IsAbs(ref) {
		r, err := filepath.Rel(im.dir, filepath.Clean(ref))
		if err != nil {
			return "", fmt.Errorf("%w %q: not inside the images directory %s", ErrUnknownImage, ref, im.dir)
		}
		rel = r
	}
	if !filepath.IsLocal(rel) {
		return "", fmt.Errorf("%w %q: not inside the images directory %s", ErrUnknownImage, ref, im.dir)
	}
	for _, cand := range []string{rel, rel + ".kimg"} {
		p := filepath.Join(im.dir, cand)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w %q: no such file in %s (list them with GET /v1/images)", ErrUnknownImage, ref, im.dir)
}

// info opens the image at path (cached while size and mtime stay the same).
func (im *images) info(path string) (apitype.ImageInfo, error) {
	e, err := im.entry(path)
	return e.info, err
}

// verified returns the image at path opened and verified, once per file
// version: every VM of a pool boots the same *image.Image.
func (im *images) verified(path string) (*image.Image, error) {
	e, err := im.entry(path)
	if err != nil {
		return nil, err
	}
	if e.verified {
		return e.img, nil
	}
	if err := e.img.Verify(); err != nil {
		return nil, err
	}
	im.mu.Lock()
	if c, ok := im.cache[path]; ok && c.img == e.img {
		c.verified = true
		im.cache[path] = c
	}
	im.mu.Unlock()
	return e.img, nil
}

// entry returns the cache entry of path, opening the file when it is new
// or changed.
func (im *images) entry(path string) (imgEntry, error) {
	st, err := os.Stat(path)
	if err != nil {
		return imgEntry{}, fmt.Errorf("%w: %v", ErrUnknownImage, err)
	}
	im.mu.Lock()
	e, ok := im.cache[path]
	im.mu.Unlock()
	if ok && e.size == st.Size() && e.mtime.Equal(st.ModTime()) {
		return e, nil
	}
	img, err := image.Open(path)
	if err != nil {
		return imgEntry{}, fmt.Errorf("opening image %s: %w", path, err)
	}
	name := strings.TrimSuffix(filepath.Base(path), ".kimg")
	if rel, err := filepath.Rel(im.dir, path); err == nil && filepath.IsLocal(rel) {
		name = strings.TrimSuffix(rel, ".kimg")
	}
	info := apitype.ImageInfo{Name: name, Path: path, Digest: img.Digest, Size: img.Size}
	if m := img.Manifest; m != nil {
		info.MemoryMiB = m.MemoryMiB
		info.Python = m.Python.Version
		info.Preload = m.Preload
		info.Modules = m.Python.Modules
	}
	e = imgEntry{size: st.Size(), mtime: st.ModTime(), info: info, img: img}
	im.mu.Lock()
	im.cache[path] = e
	im.mu.Unlock()
	return e, nil
}

// lookup resolves and opens ref.
func (im *images) lookup(ref string) (apitype.ImageInfo, error) {
	p, err := im.resolve(ref)
	if err != nil {
		return apitype.ImageInfo{}, err
	}
	return im.info(p)
}

// list opens every image file in the directory (not recursively); files
// that are not kiln images are skipped.
func (im *images) list() ([]apitype.ImageInfo, error) {
	if im.dir == "" {
		return []apitype.ImageInfo{}, nil
	}
	ents, err := os.ReadDir(im.dir)
	if err != nil {
		return nil, fmt.Errorf("listing images: %w", err)
	}
	out := []apitype.ImageInfo{}
	for _, e := range ents {
		p := filepath.Join(im.dir, e.Name())
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			continue
		}
		info, err := im.info(p)
		if err != nil {
			continue
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}
