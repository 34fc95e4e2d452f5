// Package snapshot stores VM snapshots (guest RAM file + device state) on disk, keyed by everything that makes them valid.
package snapshot

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
)

// FormatVersion is the version of the on-disk layout (meta.json) and of
// kiln's snapshot protocol. Bump it whenever a snapshot made by an older kiln
// must not be restored by a newer one.
const FormatVersion = 1

// Key identifies what a snapshot is valid for; any difference means a
// different snapshot.
type Key struct {
	ImageDigest string   `json:"image_digest"`
	Kernel      string   `json:"kernel"`     // kernel version
	VMM         string   `json:"vmm"`        // the VMM's version (vmm.Machine.Version), e.g. the first line of `qemu-system-x86_64 --version`
	Accel       string   `json:"accel"`      // "kvm" or "tcg"
	MemoryMiB   int      `json:"memory_mib"` // guest memory = size of the RAM file
	VCPUs       int      `json:"vcpus"`
	Devices     string   `json:"devices"`  // the VMM driver's fingerprint of the machine (vmm.Machine.Fingerprint)
	Preload     []string `json:"preload"`  // modules the agent imported, in order
	Protocol    int      `json:"protocol"` // 0 means FormatVersion
}

// normalize returns k with the defaults filled in, so that keys that mean
// the same thing compare (and hash) equal.
func (k Key) normalize() Key {
	if k.Protocol == 0 {
		k.Protocol = FormatVersion
	}
	if k.Preload == nil {
		k.Preload = []string{}
	}
	return k
}

// canonical returns the canonical JSON encoding of the normalized key.
func (k Key) canonical() []byte {
	b, err := json.Marshal(k.normalize())
	if err != nil { // cannot happen: strings, ints and a []string
		panic(fmt.Sprintf("snapshot: encoding key: %v", err))
	}
	return b
}

// ID returns the snapshot's identifier: the first 32 hex digits of the
// sha256 of the key's canonical JSON.
func (k Key) ID() string {
	sum := sha256.Sum256(k.canonical())
	return hex.EncodeToString(sum[:16])
}

// Equal reports whether k and o identify the same snapshot.
func (k Key) Equal(o Key) bool { return bytes.Equal(k.canonical(), o.canonical()) }

// check reports a key that cannot describe a real VM (a caller bug).
func (k Key) check() error {
	var missing []string
	if k.ImageDigest == "" {
		missing = append(missing, "image digest")
	}
	if k.Kernel == "" {
		missing = append(missing, "kernel")
	}
	if k.VMM == "" {
		missing = append(missing, "VMM version")
	}
	if k.Accel == "" {
		missing = append(missing, "accel")
	}
	if k.MemoryMiB <= 0 {
		missing = append(missing, "memory")
	}
	if k.VCPUs <= 0 {
		missing = append(missing, "vcpus")
	}
	if len(missing) > 0 {
		return fmt.Errorf("invalid snapshot key: %s not set", strings.Join(missing, ", "))
	}
	return nil
}

// validID reports whether id looks like a Key.ID (so it is safe in a path).
func validID(id string) bool {
	if len(id) != 32 {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}
