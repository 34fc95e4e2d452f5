package snapshot

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// stampDir is the store subdirectory holding verification stamps: empty
// files whose name says "this file, with this inode, size, mtime and ctime,
// was hashed and had this digest".
const stampDir = ".verified"

// racyWindow: a stamp is only written for a file whose ctime is at least
// this much older than the moment hashing started. A change made in the
// same timestamp tick as the last change before the stamp could otherwise
// leave ctime (and mtime, size, inode) unchanged and go unnoticed, like
// "racy git". Coarse kernel timestamps tick every 1-10 ms.
const racyWindow = 50 * time.Millisecond

// stampName returns the stamp file name for a file of entry id, or "" when
// fi carries no inode information.
func stampName(id, kind, path string, fi fs.FileInfo, digest string) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	s := fmt.Sprintf("%s|%d|%d|%d|%d|%s", path, st.Ino, fi.Size(), st.Mtim.Nano(), st.Ctim.Nano(), digest)
	sum := sha256.Sum256([]byte(s))
	return id + "." + kind + "." + hex.EncodeToString(sum[:16])
}

func ctime(fi fs.FileInfo) (time.Time, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return time.Time{}, false
	}
	return time.Unix(st.Ctim.Unix()), true
}

// sameFile reports whether two stats of one path show no change in between.
func sameFile(a, b fs.FileInfo) bool {
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Ino == sb.Ino && a.Size() == b.Size() && sa.Mtim == sb.Mtim && sa.Ctim == sb.Ctim
}

// hashFile returns the hex sha256 of the file at path (holes read as zeros)
// and stats taken before and after reading it.
func (s *Store) hashFile(path string) (digest string, before, after fs.FileInfo, err error) {
	s.hashes.Add(1)
	f, err := os.Open(path)
	if err != nil {
		return "", nil, nil, err
	}
	defer f.Close()
	if before, err = f.Stat(); err != nil {
		return "", nil, nil, err
	}
	h := sha256.New()
	if _, err := io.CopyBuffer(h, f, make([]byte, 1<<20)); err != nil {
		return "", nil, nil, err
	}
	if after, err = f.Stat(); err != nil {
		return "", nil, nil, err
	}
	return hex.EncodeToString(h.Sum(nil)), before, after, nil
}

// verifyFile checks that the file at path has the wanted digest, trusting
// a stamp for an unchanged file. It returns the reason when it does not.
func (s *Store) verifyFile(id, kind, path, want string) (reason string, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", err
	}
	stamps := filepath.Join(s.Dir, stampDir)
	if name := stampName(id, kind, path, fi, want); name != "" {
		if _, err := os.Stat(filepath.Join(stamps, name)); err == nil {
			return "", nil
		}
	}
	start := time.Now()
	got, before, after, err := s.hashFile(path)
	if err != nil {
		return "", err
	}
	if got != want {
		return kind + " digest mismatch", nil
	}
	s.stamp(id, kind, path, before, after, want, start)
	return "", nil
}

// stamp records that path had digest, when the file did not change while
// it was hashed and its last change is safely older than the hash.
func (s *Store) stamp(id, kind, path string, before, after fs.FileInfo, digest string, start time.Time) {
	if !sameFile(before, after) {
		return
	}
	if ct, ok := ctime(after); !ok || start.Sub(ct) < racyWindow {
		return
	}
	name := stampName(id, kind, path, after, digest)
	if name == "" {
		return
	}
	dir := filepath.Join(s.Dir, stampDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return // best effort: a missing stamp only costs time
	}
	// Drop older stamps of this file: they can never match again.
	s.removeStamps(id + "." + kind + ".")
	f, err := os.OpenFile(filepath.Join(dir, name), os.O_CREATE|os.O_WRONLY, 0o644)
	if err == nil {
		f.Close()
	}
}

// removeStamps removes the stamps whose name starts with prefix.
func (s *Store) removeStamps(prefix string) {
	dir := filepath.Join(s.Dir, stampDir)
	names, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, d := range names {
		if strings.HasPrefix(d.Name(), prefix) {
			os.Remove(filepath.Join(dir, d.Name()))
		}
	}
}
