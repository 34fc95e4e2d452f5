package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint"
	"github.com/kiln-dev/kiln/internal/guest/task"
)

// clientFlags locate the endpoint for submit and result.
type clientFlags struct {
	url, token, state string
}

func (f *clientFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.url, "url", "", "endpoint URL (default $KILN_URL, else http://"+endpoint.DefaultListen+")")
	cmd.Flags().StringVar(&f.token, "token", "", "API token (default $KILN_TOKEN, else the token file in the state directory)")
	cmd.Flags().StringVar(&f.state, "state", "", "the endpoint's state directory, for its token file (default $KILN_STATE, else ~/.local/state/kiln)")
}

func (f *clientFlags) client() (*endpoint.Client, error) {
	return endpoint.NewClient(f.url, f.token, f.state)
}

func newSubmitCmd(a *app) *cobra.Command {
	var cf clientFlags
	var fnID, file, name, ref, image, args, kwargs string
	var timeout, wait time.Duration
	var retries int
	cmd := &cobra.Command{
		Use:   "submit (--function-id ID | --image IMAGE (--file handler.py [--function FN] | --ref MOD:FN)) [--args JSON]",
		Short: "Queue a task on a kiln serve endpoint",
		Long: `Submit queues one call of a function on a kiln serve endpoint and prints the
task id as JSON. The function is either one registered before (--function-id)
or registered now from a Python file (--file, sending its source) or a
module:function importable in the image (--ref). With --wait it waits for the
task and prints it as kiln result does.`,
		Example: `  kiln submit --image numpy --file handler.py --function work --args '[1000]'
  kiln submit --image numpy --ref math:factorial --args '[20]' --wait 1m
  kiln submit --function-id fn-3f2a... --args '[1, 2]' --kwargs '{"scale": 3}'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if fnID == "" {
				req := &endpoint.RegisterRequest{Image: image, Timeout: endpoint.Duration(timeout), MaxRetries: retries}
				switch {
				case image == "":
					return errors.New("give --function-id ID, or --image IMAGE with --file or --ref")
				case file != "":
					src, err := os.ReadFile(file)
					if err != nil {
						return fmt.Errorf("reading --file: %w", err)
					}
					req.Kind, req.Source, req.Function = task.KindSource, string(src), name
				case ref != "":
					if !strings.Contains(ref, ":") {
						return fmt.Errorf("--ref %q: want MOD:FN (e.g. math:factorial)", ref)
					}
					req.Kind, req.Ref = task.KindRef, ref
				default:
					return errors.New("nothing to call: give --file handler.py [--function FN] or --ref MOD:FN")
				}
				fv, err := c.Register(ctx, req)
				if err != nil {
					return err
				}
				fnID = fv.ID
			}
			sreq := &endpoint.SubmitRequest{FunctionID: fnID}
			if sreq.Args, err = jsonValue("--args", args, '['); err != nil {
				return err
			}
			if sreq.Kwargs, err = jsonValue("--kwargs", kwargs, '{'); err != nil {
				return err
			}
			id, err := c.Submit(ctx, sreq)
			if err != nil {
				return err
			}
			if wait <= 0 {
				return a.printJSON(map[string]string{"task_id": id, "function_id": fnID})
			}
			tv, err := c.Await(ctx, id, wait)
			if err != nil {
				return err
			}
			return printTask(a, tv)
		},
	}
	cf.add(cmd)
	f := cmd.Flags()
	f.StringVar(&fnID, "function-id", "", "a registered function's id")
	f.StringVar(&image, "image", "", "image name (see GET /v1/images) to register the function with")
	f.StringVar(&file, "file", "", "Python file whose source is sent")
	f.StringVar(&name, "function", "", "with --file: the function to call (default: the only one the file defines)")
	f.StringVar(&ref, "ref", "", "MOD:FN importable inside the image")
	f.StringVar(&args, "args", "[]", "positional arguments as a JSON list")
	f.StringVar(&kwargs, "kwargs", "", "keyword arguments as a JSON object")
	f.DurationVar(&timeout, "timeout", 0, "when registering: per-task time limit (default: the endpoint's)")
	f.IntVar(&retries, "max-retries", 0, "when registering: retries after a VM crash or endpoint restart")
	f.DurationVar(&wait, "wait", 0, "wait this long for the task and print it")
	return cmd
}

func jsonValue(flag, s string, want byte) (*task.Value, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	if !json.Valid([]byte(s)) || s[0] != want {
		kind := map[byte]string{'[': "list", '{': "object"}[want]
		return nil, fmt.Errorf("%s must be a JSON %s, e.g. %s", flag, kind, map[byte]string{'[': `'[1, "a"]'`, '{': `'{"k": 1}'`}[want])
	}
	return &task.Value{Enc: task.EncJSON, Data: json.RawMessage(s)}, nil
}
