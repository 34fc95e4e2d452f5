package main

import (
	"encoding/json"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/endpoint/apitype"
)

func newResultCmd(a *app) *cobra.Command {
	var cf clientFlags
	var wait time.Duration
	var valueOnly bool
	cmd := &cobra.Command{
		Use:   "result TASK_ID",
		Short: "Print a task of a kiln serve endpoint: state, value or error",
		Long: `Result prints a task as JSON: its state, and when it finished its result
(value, stdout, stderr, timings) or error with the remote traceback. With
--wait it waits up to that long for the task to finish. It exits with
status 1 when the task failed or was cancelled, and 2 when it has not
finished yet.`,
		Example: `  kiln result t-5d0c... --wait 30s
  kiln result t-5d0c... --value`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			tv, err := c.Await(cmd.Context(), args[0], wait)
			if err != nil {
				return err
			}
			if valueOnly && tv.State == apitype.StateSucceeded {
				var r struct {
					Value json.RawMessage `json:"value"`
				}
				if err := json.Unmarshal(tv.Result, &r); err != nil {
					return err
				}
				var v any
				if err := json.Unmarshal(r.Value, &v); err != nil {
					return err
				}
				return a.printJSON(v)
			}
			return printTask(a, tv)
		},
	}
	cf.add(cmd)
	cmd.Flags().DurationVar(&wait, "wait", 0, "wait up to this long for the task to finish")
	cmd.Flags().BoolVar(&valueOnly, "value", false, "print only the value ({\"enc\":…,\"data\":…}) of a successful task")
	return cmd
}

// printTask prints tv and turns its state into the exit status.
func printTask(a *app, tv *apitype.TaskView) error {
	if err := a.printJSON(tv); err != nil {
		return err
	}
	switch tv.State {
	case apitype.StateSucceeded:
		return nil
	case apitype.StateFailed, apitype.StateCancelled:
		return exitCode(1)
	default:
		return exitCode(2)
	}
}
