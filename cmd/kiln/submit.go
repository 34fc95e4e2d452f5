package main

import (
	"errors"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint"
	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
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
	var tf taskFlags
	var fnID, image string
	var timeout, wait, walltime time.Duration
	var retries int
	var shell string
	cmd := &cobra.Command{
		Use:   "submit (--function-id ID | --image IMAGE (--file handler.py [--function FN] | --ref MOD:FN | --shell CMD)) [--args JSON]",
		Short: "Queue a task on a kiln serve endpoint",
		Long: `Submit queues one call of a function on a kiln serve endpoint and prints the
task id as JSON. The function is either one registered before (--function-id)
or registered now from a Python file (--file, sending its source) or a
module:function importable in the image (--ref), or a shell command
(--shell, run by /bin/sh -c in the VM; {name} fields are filled from
--kwargs as Python's str.format does, and --walltime ends it with
returncode 124). With --wait it waits for the task and prints it as kiln
result does.`,
		Example: `  kiln submit --image numpy --file handler.py --function work --args '[1000]'
  kiln submit --image numpy --ref math:factorial --args '[20]' --wait 1m
  kiln submit --function-id fn-3f2a... --args '[1, 2]' --kwargs '{"scale": 3}'
  kiln submit --image numpy --shell 'python3 -c "print({n} * 2)"' --kwargs '{"n": 21}' --wait 1m`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if fnID == "" {
				if image == "" {
					return errors.New("give --function-id ID, or --image IMAGE with --file, --ref or --shell")
				}
				req := &apitype.RegisterRequest{Image: image, Timeout: apitype.Duration(timeout), MaxRetries: retries}
				if shell != "" {
					if tf.file != "" || tf.ref != "" || tf.function != "" {
						return errors.New("--shell excludes --file, --ref and --function: a task runs a command or calls a function")
					}
					req.Kind, req.Command, req.Walltime = task.KindShell, shell, walltime.Seconds()
				} else {
					if walltime != 0 {
						return errors.New("--walltime applies to --shell commands; for functions use --timeout")
					}
					t, err := tf.task()
					if err != nil {
						return err
					}
					req.Kind, req.Source, req.Function, req.Ref, req.Filename = t.Kind, t.Source, t.Name, t.Ref, t.Filename
				}
				fv, err := c.Register(ctx, req)
				if err != nil {
					return err
				}
				fnID = fv.ID
			}
			sreq := &apitype.SubmitRequest{FunctionID: fnID}
			if sreq.Args, err = jsonValue("--args", tf.args, '['); err != nil {
				return err
			}
			if sreq.Kwargs, err = jsonValue("--kwargs", tf.kwargs, '{'); err != nil {
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
	tf.add(cmd)
	f.StringVar(&shell, "shell", "", "register a shell command, run by /bin/sh -c in the VM, {name} fields filled from --kwargs")
	f.DurationVar(&walltime, "walltime", 0, "with --shell: kill the command after this long (returncode 124)")
	f.DurationVar(&timeout, "timeout", 0, "when registering: per-task time limit (default: the endpoint's)")
	f.IntVar(&retries, "max-retries", 0, "when registering: retries after a VM crash or endpoint restart")
	f.DurationVar(&wait, "wait", 0, "wait this long for the task and print it")
	return cmd
}
