// Package proto is the framed, versioned wire protocol spoken between the host and the guest (init and agent).
//
// A frame is an 8-byte header — magic 'K', version, type, flags, big-endian
// uint32 payload length — followed by the payload. The protocol is
// transport-agnostic: any byte stream (a virtio-serial port today, vsock
// later) carries it unchanged.
package proto

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Magic is the first byte of every frame.
const Magic = 'K'

// Version is the protocol version written in every frame.
const Version = 1

// HeaderSize is the size of a frame header in bytes.
const HeaderSize = 8

// DefaultMax is the default payload limit of a Reader.
const DefaultMax = 16 << 20

// Type says what a frame carries.
type Type byte

// Frame types; see docs/design.md for directions and payloads.
const (
	Hello    Type = 0x01
	Config   Type = 0x02
	Stdout   Type = 0x03
	Stderr   Type = 0x04
	Exit     Type = 0x05
	Event    Type = 0x06
	Log      Type = 0x07
	Stdin    Type = 0x08
	Mount    Type = 0x09
	Mounted  Type = 0x0a
	Ready    Type = 0x10
	Task     Type = 0x11
	Result   Type = 0x12
	Reseed   Type = 0x13
	Reseeded Type = 0x14
	// Tasks carries several tasks of one function (task.Batch); the agent
	// answers each with its own Result frame, in order.
	Tasks Type = 0x15
)

var typeNames = map[Type]string{
	Hello: "hello", Config: "config", Stdout: "stdout", Stderr: "stderr", Exit: "exit",
	Event: "event", Log: "log", Stdin: "stdin", Mount: "mount", Mounted: "mounted", Ready: "ready", Task: "task", Result: "result",
	Reseed: "reseed", Reseeded: "reseeded", Tasks: "tasks",
}

func (t Type) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("type(0x%02x)", byte(t))
}

// Errors returned by Reader.Next for a stream that is not this protocol.
var (
	ErrBadMagic   = errors.New("bad frame magic: the peer does not speak the kiln protocol")
	ErrBadVersion = errors.New("unsupported frame version: host and guest kiln versions differ; rebuild the image")
)

// TooLargeError reports a frame whose payload exceeded the reader's limit.
// The payload has been discarded, so the stream is still in sync.
type TooLargeError struct {
	Type   Type
	Length uint32
	Max    uint32
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("%s frame of %d bytes exceeds the limit of %d bytes", e.Type, e.Length, e.Max)
}

// Frame is one decoded frame.
type Frame struct {
	Type    Type
	Payload []byte
}

// Write writes one frame with a single Write call on w.
func Write(w io.Writer, t Type, payload []byte) error {
	if uint64(len(payload)) > 0xffffffff {
		return fmt.Errorf("writing %s frame: payload of %d bytes is too large", t, len(payload))
	}
	buf := make([]byte, HeaderSize+len(payload))
	buf[0], buf[1], buf[2], buf[3] = Magic, Version, byte(t), 0
	binary.BigEndian.PutUint32(buf[4:8], uint32(len(payload)))
	copy(buf[HeaderSize:], payload)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("writing %s frame: %w", t, err)
	}
	return nil
}

// WriteJSON marshals v and writes it as one frame of type t.
func WriteJSON(w io.Writer, t Type, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encoding %s frame: %w", t, err)
	}
	return Write(w, t, b)
}

// Reader decodes frames from a stream. It is not safe for concurrent use.
type Reader struct {
	r   io.Reader
	max uint32
	hdr [HeaderSize]byte
}

// NewReader returns a Reader that rejects payloads longer than max bytes
// (0 means DefaultMax).
func NewReader(r io.Reader, max uint32) *Reader {
	if max == 0 {
		max = DefaultMax
	}
	return &Reader{r: r, max: max}
}

// SetMax changes the payload limit for later frames.
func (r *Reader) SetMax(max uint32) { r.max = max }

// Next reads the next frame. At a clean end of stream it returns io.EOF; a
// stream cut inside a frame gives io.ErrUnexpectedEOF.
func (r *Reader) Next() (Frame, error) {
	if _, err := io.ReadFull(r.r, r.hdr[:]); err != nil {
		return Frame{}, err
	}
	if r.hdr[0] != Magic {
		return Frame{}, ErrBadMagic
	}
	if r.hdr[1] != Version {
		return Frame{}, fmt.Errorf("%w (got %d, want %d)", ErrBadVersion, r.hdr[1], Version)
	}
	t := Type(r.hdr[2])
	n := binary.BigEndian.Uint32(r.hdr[4:8])
	if n > r.max {
		if _, err := io.CopyN(io.Discard, r.r, int64(n)); err != nil {
			return Frame{}, unexpected(err)
		}
		return Frame{}, &TooLargeError{Type: t, Length: n, Max: r.max}
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r.r, p); err != nil {
		return Frame{}, unexpected(err)
	}
	return Frame{Type: t, Payload: p}, nil
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}
