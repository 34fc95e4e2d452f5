package sandbox

import (
	"errors"
	"fmt"

	"github.com/kiln-dev/kiln/internal/guest/task"
)

// Kind classifies a sandbox failure so callers can react to it with
// errors.Is(err, sandbox.ErrTimeout) and friends.
type Kind string

// Failure kinds: the task failure kinds of package task, and closed.
const (
	KindTimeout  Kind = task.ErrorTimeout  // the task ran past its timeout; the VM was replaced
	KindTooLarge Kind = task.ErrorTooLarge // the result or output exceeded its cap
	KindOOM      Kind = task.ErrorOOM      // the guest ran out of memory
	KindVMDied   Kind = task.ErrorVMDied   // the guest crashed, powered off or stopped answering
	KindStart    Kind = task.ErrorStart    // the VM could not be started
	KindClosed   Kind = "closed"           // the sandbox was closed (a host-side state, never on a wire)
)

// Sentinels for errors.Is.
var (
	ErrTimeout  = &Error{Kind: KindTimeout}
	ErrTooLarge = &Error{Kind: KindTooLarge}
	ErrOOM      = &Error{Kind: KindOOM}
	ErrVMDied   = &Error{Kind: KindVMDied}
	ErrClosed   = &Error{Kind: KindClosed}
	ErrStart    = &Error{Kind: KindStart}
)

// Error is a sandbox failure of a given Kind.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	msg := e.Msg
	if msg == "" {
		msg = string(e.Kind)
	}
	if e.Err != nil {
		return fmt.Sprintf("%s: %v", msg, e.Err)
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// Is reports whether target is an *Error of the same Kind.
func (e *Error) Is(target error) bool {
	var t *Error
	if errors.As(target, &t) {
		return t.Kind == e.Kind
	}
	return false
}

// KindOf returns the Kind of err, or "" when err is not a sandbox error.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return ""
}
