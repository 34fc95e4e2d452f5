package sandbox

import (
	"context"
	_ "embed"
	"encoding/base64"
	"fmt"

	"github.com/kiln-dev/kiln/internal/guest/task"
)

// runSource is the function Run sends to the agent: it runs a command in
// the warm guest, forking the agent for python3 -c/-m/script commands so
// they inherit its preloaded modules.
//
//go:embed run.py
var runSource string

// RunResult is how a command run by Run ended.
type RunResult struct {
	Code            int
	Stdout, Stderr  []byte
	StdoutTruncated bool
	StderrTruncated bool
}

type runValue struct {
	Code            int    `json:"code"`
	Stdout          string `json:"stdout"`
	Stderr          string `json:"stderr"`
	StdoutTruncated bool   `json:"stdout_truncated"`
	StderrTruncated bool   `json:"stderr_truncated"`
}

// Run runs a command in the warm VM and returns its exit status and output
// once it has exited (output is not streamed; each stream is capped at
// Options.MaxOutput). A python3 -c, -m or script command runs in a fork of
// the agent, so modules the agent preloaded are already imported; any other
// command runs as a child process. env is added to the image's environment.
func (s *Sandbox) Run(ctx context.Context, argv []string, env map[string]string) (*RunResult, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("running a command: empty command")
	}
	if env == nil {
		env = map[string]string{}
	}
	args, err := task.JSONValue([]any{argv, env, s.opts.MaxOutput})
	if err != nil {
		return nil, err
	}
	res, err := s.Invoke(ctx, &task.Task{Kind: task.KindSource, Source: runSource, Name: "kiln_run", Args: &args})
	if err != nil {
		return nil, err
	}
	if !res.OK {
		msg := res.ErrorKind
		if res.Error != nil {
			msg = res.Error.Type + ": " + res.Error.Message
		}
		return nil, fmt.Errorf("running the command in the guest: %s", msg)
	}
	var v runValue
	if err := res.Value.Decode(&v); err != nil {
		return nil, fmt.Errorf("decoding the command's result: %w", err)
	}
	out, err := base64.StdEncoding.DecodeString(v.Stdout)
	if err != nil {
		return nil, fmt.Errorf("decoding the command's stdout: %w", err)
	}
	errb, err := base64.StdEncoding.DecodeString(v.Stderr)
	if err != nil {
		return nil, fmt.Errorf("decoding the command's stderr: %w", err)
	}
	return &RunResult{Code: v.Code, Stdout: out, Stderr: errb, StdoutTruncated: v.StdoutTruncated, StderrTruncated: v.StderrTruncated}, nil
}
