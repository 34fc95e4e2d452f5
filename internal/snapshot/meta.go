package snapshot

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Meta is the content of an entry's meta.json.
type Meta struct {
	Format      int       `json:"format"`
	Key         Key       `json:"key"`
	Created     time.Time `json:"created"`
	RAMSize     int64     `json:"ram_size"`
	StateSize   int64     `json:"state_size"`
	RAMSHA256   string    `json:"ram_sha256"`
	StateSHA256 string    `json:"state_sha256"`
}

// maxMetaSize bounds meta.json; a real one is well under 1 KiB.
const maxMetaSize = 64 << 10

// decodeMeta decodes meta.json strictly: one JSON object, no unknown fields,
// no trailing data (json.Unmarshal in the peek rejects it), plausible sizes and digests. The format version is
// checked first, so a meta.json written by another kiln version is reported
// as such rather than as a syntax problem. Errors are short reasons meant
// for InvalidError.
func decodeMeta(data []byte) (Meta, error) {
	if len(data) > maxMetaSize {
		return Meta{}, fmt.Errorf("meta.json: %d bytes, more than %d", len(data), maxMetaSize)
	}
	var peek struct {
		Format *int `json:"format"`
	}
	if err := json.Unmarshal(data, &peek); err != nil {
		return Meta{}, fmt.Errorf("meta.json: %v", err)
	}
	if peek.Format == nil {
		return Meta{}, errors.New("meta.json: no format version")
	}
	if *peek.Format != FormatVersion {
		return Meta{}, fmt.Errorf("format version %d, want %d", *peek.Format, FormatVersion)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var m Meta
	if err := dec.Decode(&m); err != nil {
		return Meta{}, fmt.Errorf("meta.json: %v", err)
	}
	switch {
	case m.Created.IsZero():
		return Meta{}, errors.New("meta.json: no creation time")
	case m.RAMSize <= 0:
		return Meta{}, fmt.Errorf("meta.json: ram size %d", m.RAMSize)
	case m.StateSize <= 0:
		return Meta{}, fmt.Errorf("meta.json: state size %d", m.StateSize)
	case !validDigest(m.RAMSHA256):
		return Meta{}, fmt.Errorf("meta.json: bad ram digest %q", m.RAMSHA256)
	case !validDigest(m.StateSHA256):
		return Meta{}, fmt.Errorf("meta.json: bad state digest %q", m.StateSHA256)
	}
	if err := m.Key.check(); err != nil {
		return Meta{}, fmt.Errorf("meta.json: %v", err)
	}
	return m, nil
}

func encodeMeta(m Meta) ([]byte, error) {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

func validDigest(s string) bool {
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
