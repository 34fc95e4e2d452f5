// Package image reads and writes kiln's single-file image format: a header and index followed by 4096-aligned parts.
package image

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/kiln-dev/kiln/internal/spec"

	"github.com/google/renameio/v2"
)

// FormatVersion is the image format version written by Create and accepted by Open.
const FormatVersion = 1

// Part names, in file order.
const (
	PartManifest  = "manifest"
	PartKernel    = "kernel"
	PartInitramfs = "initramfs"
	PartRootfs    = "rootfs"
)

// PartNames lists every part of an image in file order.
var PartNames = []string{PartManifest, PartKernel, PartInitramfs, PartRootfs}

const (
	// Align is the alignment of every part and the size of the header.
	Align = 4096
	// Magic starts every image file.
	Magic = "KILNIMG\x00"

	headerFixed    = 16 // magic (8) + version (4) + index length (4)
	maxIndexLen    = Align - headerFixed
	maxManifestLen = 16 << 20
)

// ErrCorrupt is wrapped by every error about a damaged or unreadable image file.
var ErrCorrupt = errors.New("corrupt kiln image")

// ErrVersion is wrapped (with ErrCorrupt) when the image has a format version
// this kiln does not support.
var ErrVersion = errors.New("unsupported image format version")

// Manifest describes an image; it is stored as JSON in the manifest part.
type Manifest struct {
	Format        int               `json:"format"`
	Name          string            `json:"name"`
	Spec          *spec.Spec        `json:"spec"`
	Python        Python            `json:"python"`
	Distributions []Distribution    `json:"distributions"`
	Kernel        Kernel            `json:"kernel"`
	Rootfs        Rootfs            `json:"rootfs"`
	Command       []string          `json:"command,omitempty"`
	Env           map[string]string `json:"env,omitempty"`
	MemoryMiB     int               `json:"memory_mib"`
	VCPUs         int               `json:"vcpus"`
	Preload       []string          `json:"preload,omitempty"`
	Agent         []string          `json:"agent"`
	KilnVersion   string            `json:"kiln_version"`
}

// Python describes the interpreter inside the image.
type Python struct {
	Version    string `json:"version"`    // "3.11.2"
	Executable string `json:"executable"` // guest path, e.g. /usr/bin/python3.11
	Debian     bool   `json:"debian"`     // Debian's own interpreter
	// Modules are the top-level modules of the image's packages (not the
	// standard library): clients send a function of one of these by
	// reference rather than by source.
	Modules []string `json:"modules,omitempty"`
}

// Distribution is one installed Python distribution or Debian package.
type Distribution struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	Source  string `json:"source"` // "debian", "pip" or "python"
}

// Kernel describes the guest kernel.
type Kernel struct {
	// Kind is "minimal" (kiln's own kernel, built from its config
	// fragment), "debian" (Debian's cloud kernel) or "local" (--kernel);
	// "" in images built before kiln had its own kernel (see KernelKind).
	Kind           string `json:"kind,omitempty"`
	Version        string `json:"version"`
	Package        string `json:"package"`                 // the Debian package it came from (linux-image-… or linux-source-…)
	PackageVersion string `json:"package_version"`         // that package's version
	ConfigDigest   string `json:"config_digest,omitempty"` // sha256 hex of the kernel's .config, when known
	// Encoding is how the kernel part is stored: "" as is (a bzImage), or
	// KernelGzip (an uncompressed vmlinux for PVH boot is mostly zero
	// padding between 2 MiB-aligned segments). BootFiles decodes it.
	Encoding string `json:"encoding,omitempty"`
	// Size is the decoded kernel's size in bytes, when Encoding is set.
	Size    int64    `json:"size,omitempty"`
	Modules []string `json:"modules"` // module names in load order; none for a module-less kernel
}

// KernelGzip is Kernel.Encoding for a gzip-compressed kernel part.
const KernelGzip = "gzip"

// KernelKind returns the kernel's kind; for images that predate the
// field, "debian" (or "local" when no package is recorded).
func (m *Manifest) KernelKind() string {
	switch {
	case m.Kernel.Kind != "":
		return m.Kernel.Kind
	case m.Kernel.Package == "":
		return "local"
	}
	return "debian"
}

// Rootfs describes the root filesystem part.
type Rootfs struct {
	Filesystem  string `json:"filesystem"` // "erofs"
	Compression string `json:"compression"`
	Files       int    `json:"files"`
	TreeBytes   int64  `json:"tree_bytes"`
}

// PartSource names a host file whose bytes become a part.
type PartSource struct {
	Name string
	Path string
}

// Part is one entry of the image index.
type Part struct {
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

type index struct {
	Parts []Part `json:"parts"`
}

// Image is an opened image file. Its parts are read from Path on demand.
type Image struct {
	Path     string // absolute
	Digest   string // hex sha256 of the index JSON; covers every part
	Size     int64
	Parts    []Part
	Manifest *Manifest
}

// imageError is a problem with an image file's contents. It matches
// ErrCorrupt (and ErrVersion when version is set) with errors.Is.
type imageError struct {
	msg     string
	version bool
	err     error // underlying cause, if any
}

func (e *imageError) Error() string { return e.msg }
func (e *imageError) Unwrap() error { return e.err }
func (e *imageError) Is(target error) bool {
	return target == ErrCorrupt || (e.version && target == ErrVersion)
}

func corrupt(path, format string, args ...any) error {
	return &imageError{msg: path + ": " + fmt.Sprintf(format, args...)}
}

func alignUp(n int64) int64 { return (n + Align - 1) &^ (Align - 1) }

// Create writes an image to path: the manifest generated from m, then the
// kernel, initramfs and rootfs parts copied from parts. The file is written
// to a temporary file next to path and renamed into place, so readers never
// see a partial image. The same inputs always produce the same bytes. It
// returns the image digest.
func Create(path string, m *Manifest, parts []PartSource) (digest string, err error) {
	if m == nil {
		return "", errors.New("creating image: nil manifest")
	}
	mc := *m
	if mc.Format == 0 {
		mc.Format = FormatVersion
	}
	if mc.Format != FormatVersion {
		return "", fmt.Errorf("creating image: manifest format %d, want %d", mc.Format, FormatVersion)
	}
	manifest, err := json.Marshal(&mc)
	if err != nil {
		return "", fmt.Errorf("encoding manifest: %w", err)
	}
	srcs := map[string]string{}
	for _, p := range parts {
		switch {
		case p.Name == PartManifest:
			return "", errors.New("creating image: the manifest part is generated from the Manifest, do not pass it as a part")
		case !isPartName(p.Name):
			return "", fmt.Errorf("creating image: unknown part %q", p.Name)
		case srcs[p.Name] != "":
			return "", fmt.Errorf("creating image: part %q given twice", p.Name)
		case p.Path == "":
			return "", fmt.Errorf("creating image: part %q has no path", p.Name)
		}
		srcs[p.Name] = p.Path
	}
	for _, name := range PartNames[1:] {
		if srcs[name] == "" {
			return "", fmt.Errorf("creating image: missing part %q", name)
		}
	}

	tmp, err := renameio.NewPendingFile(path, renameio.WithTempDir(filepath.Dir(path)), renameio.WithStaticPermissions(0o644))
	if err != nil {
		return "", fmt.Errorf("creating image: %w", err)
	}
	defer tmp.Cleanup()

	idx := index{}
	off := int64(Align)
	write := func(name string, r io.Reader) error {
		if _, err := tmp.Seek(off, io.SeekStart); err != nil {
			return err
		}
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(tmp, h), r)
		if err != nil {
			return fmt.Errorf("writing part %s: %w", name, err)
		}
		idx.Parts = append(idx.Parts, Part{Name: name, Offset: off, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))})
		end := alignUp(off + n)
		if pad := end - (off + n); pad > 0 {
			if _, err := tmp.Write(make([]byte, pad)); err != nil {
				return fmt.Errorf("writing part %s: %w", name, err)
			}
		}
		off = end
		return nil
	}
	if err := write(PartManifest, bytes.NewReader(manifest)); err != nil {
		return "", fmt.Errorf("creating image: %w", err)
	}
	for _, name := range PartNames[1:] {
		f, err := os.Open(srcs[name])
		if err != nil {
			return "", fmt.Errorf("creating image: part %s: %w", name, err)
		}
		err = write(name, f)
		f.Close()
		if err != nil {
			return "", fmt.Errorf("creating image: %w", err)
		}
	}
	ij, err := json.Marshal(&idx)
	if err != nil {
		return "", fmt.Errorf("encoding image index: %w", err)
	}
	if len(ij) > maxIndexLen {
		return "", fmt.Errorf("creating image: index is %d bytes, more than the %d that fit in the header", len(ij), maxIndexLen)
	}
	hdr := make([]byte, Align)
	copy(hdr, Magic)
	binary.LittleEndian.PutUint32(hdr[len(Magic):], FormatVersion)
	binary.LittleEndian.PutUint32(hdr[len(Magic)+4:], uint32(len(ij)))
	copy(hdr[headerFixed:], ij)
	if _, err := tmp.WriteAt(hdr, 0); err != nil {
		return "", fmt.Errorf("writing image header: %w", err)
	}
	if err := tmp.CloseAtomicallyReplace(); err != nil {
		return "", fmt.Errorf("creating image: %w", err)
	}
	sum := sha256.Sum256(ij)
	return hex.EncodeToString(sum[:]), nil
}

func isPartName(name string) bool {
	for _, n := range PartNames {
		if n == name {
			return true
		}
	}
	return false
}

// DecodeIndex parses and checks an index JSON document: strict fields, every
// part present exactly once, aligned, non-overlapping, with a sha256.
func DecodeIndex(data []byte) ([]Part, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var idx index
	if err := dec.Decode(&idx); err != nil {
		return nil, indexError("decoding index: %v", err)
	}
	if dec.More() {
		return nil, indexError("trailing data after index")
	}
	seen := map[string]bool{}
	for _, p := range idx.Parts {
		switch {
		case !isPartName(p.Name):
			return nil, indexError("index names unknown part %q", p.Name)
		case seen[p.Name]:
			return nil, indexError("index lists part %q twice", p.Name)
		case p.Offset < Align || p.Offset%Align != 0:
			return nil, indexError("part %s has bad offset %d (must be a multiple of %d after the header)", p.Name, p.Offset, Align)
		case p.Size < 0 || p.Size > (1<<62)-p.Offset:
			return nil, indexError("part %s has bad size %d", p.Name, p.Size)
		case !isSHA256(p.SHA256):
			return nil, indexError("part %s has a malformed sha256 %q", p.Name, p.SHA256)
		}
		seen[p.Name] = true
	}
	for _, n := range PartNames {
		if !seen[n] {
			return nil, indexError("index has no %s part", n)
		}
	}
	sorted := append([]Part(nil), idx.Parts...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Offset < sorted[j].Offset })
	for i := 1; i < len(sorted); i++ {
		a, b := sorted[i-1], sorted[i]
		if a.Offset+a.Size > b.Offset {
			return nil, indexError("parts %s and %s overlap", a.Name, b.Name)
		}
	}
	return idx.Parts, nil
}

func indexError(format string, args ...any) error {
	return &imageError{msg: "bad image index: " + fmt.Sprintf(format, args...)}
}

func isSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// Open reads an image's header, index and manifest and checks that every
// part lies inside the file. It does not hash the large parts: see Verify.
func Open(path string) (*Image, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("opening image: %w", err)
	}
	f, err := os.Open(abs)
	if err != nil {
		return nil, fmt.Errorf("opening image (build one with kiln build): %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("opening image: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, corrupt(path, "not a regular file")
	}
	size := fi.Size()
	if size == 0 {
		return nil, corrupt(path, "file is empty, not a kiln image; rebuild it with kiln build")
	}
	hdr := make([]byte, min(size, Align))
	if _, err := io.ReadFull(f, hdr); err != nil {
		return nil, &imageError{msg: fmt.Sprintf("%s: reading header: %v", path, err), err: err}
	}
	if len(hdr) < len(Magic) || string(hdr[:len(Magic)]) != Magic {
		if len(hdr) < len(Magic) && string(hdr) == Magic[:len(hdr)] {
			return nil, corrupt(path, "image truncated: header is %d bytes, rebuild it with kiln build", len(hdr))
		}
		return nil, corrupt(path, "not a kiln image (bad magic %q)", hdr[:min(len(hdr), len(Magic))])
	}
	if len(hdr) < headerFixed {
		return nil, corrupt(path, "image truncated: header is %d bytes, rebuild it with kiln build", len(hdr))
	}
	if v := binary.LittleEndian.Uint32(hdr[len(Magic):]); v != FormatVersion {
		return nil, &imageError{version: true, msg: fmt.Sprintf("%s: image format version %d, this kiln reads version %d; rebuild it with this kiln's kiln build", path, v, FormatVersion)}
	}
	n := int64(binary.LittleEndian.Uint32(hdr[len(Magic)+4:]))
	if n == 0 || n > maxIndexLen {
		return nil, corrupt(path, "index length %d out of range (1..%d)", n, maxIndexLen)
	}
	if int64(len(hdr)) < int64(headerFixed)+n {
		return nil, corrupt(path, "image truncated: file is %d bytes, the index alone needs %d, rebuild it with kiln build", size, int64(headerFixed)+n)
	}
	ij := hdr[headerFixed : int64(headerFixed)+n]
	parts, err := DecodeIndex(ij)
	if err != nil {
		return nil, fmt.Errorf("%s: %w; rebuild it with kiln build", path, err)
	}
	for _, p := range parts {
		if p.Offset+p.Size > size {
			return nil, corrupt(path, "image truncated: part %s ends at byte %d but the file has %d bytes, rebuild it with kiln build", p.Name, p.Offset+p.Size, size)
		}
	}
	sum := sha256.Sum256(ij)
	img := &Image{Path: abs, Digest: hex.EncodeToString(sum[:]), Size: size, Parts: parts}

	mp, _ := img.Part(PartManifest)
	if mp.Size > maxManifestLen {
		return nil, corrupt(path, "manifest is %d bytes, more than the limit of %d", mp.Size, maxManifestLen)
	}
	mb := make([]byte, mp.Size)
	if _, err := f.ReadAt(mb, mp.Offset); err != nil {
		return nil, &imageError{msg: fmt.Sprintf("%s: reading manifest: %v", path, err), err: err}
	}
	if got := sha256.Sum256(mb); hex.EncodeToString(got[:]) != mp.SHA256 {
		return nil, corrupt(path, "manifest sha256 mismatch (file damaged), rebuild it with kiln build")
	}
	var m Manifest
	if err := json.Unmarshal(mb, &m); err != nil {
		return nil, corrupt(path, "decoding manifest: %v", err)
	}
	if m.Format != FormatVersion {
		return nil, &imageError{version: true, msg: fmt.Sprintf("%s: manifest format %d, this kiln reads %d; rebuild it with this kiln's kiln build", path, m.Format, FormatVersion)}
	}
	img.Manifest = &m
	return img, nil
}

// Part returns the index entry of the named part.
func (img *Image) Part(name string) (Part, bool) {
	for _, p := range img.Parts {
		if p.Name == name {
			return p, true
		}
	}
	return Part{}, false
}
