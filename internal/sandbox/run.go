package sandbox

import (
	"context"
	"fmt"
	"strings"

	"github.com/kiln-dev/kiln/internal/guest/task"
)

// Run runs a command in the warm VM with its fds connected to st and
// returns its exit status (128+N when signal N killed it). Output is
// streamed, not captured: there is no cap. A python3 -c, -m or script
// command runs in a fork of the agent, so modules the agent preloaded are
// already imported; any other command runs as a child process. env is
// added to the image's environment.
func (s *Sandbox) Run(ctx context.Context, argv []string, env map[string]string, st Streams) (int, error) {
	if len(argv) == 0 {
		return 0, fmt.Errorf("running a command: empty command")
	}
	res, err := s.InvokeStreams(ctx, &task.Task{Kind: task.KindRun, Argv: argv, Env: env}, st)
	if err != nil {
		return 0, err
	}
	if !res.OK {
		msg := res.ErrorKind
		if res.Error != nil {
			msg = res.Error.Type + ": " + res.Error.Message
			if strings.Contains(res.Error.Message, "unknown task kind 'run'") {
				return 0, fmt.Errorf("running the command in the guest: the image's agent is older than this kiln; rebuild the image (kiln build)")
			}
		}
		return 0, fmt.Errorf("running the command in the guest: %s", msg)
	}
	var v struct {
		Code int `json:"code"`
	}
	if err := res.Value.Decode(&v); err != nil {
		return 0, fmt.Errorf("decoding the command's result: %w", err)
	}
	return v.Code, nil
}
