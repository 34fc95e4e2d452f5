package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/sandbox"
)

func newSnapshotCreateCmd(a *app, o *snapshotOpts) *cobra.Command {
	var vf vmFlags
	var preload string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "create IMAGE",
		Short: "Boot an image, import its preload modules and save a snapshot to restore clones from",
		Long: `Create cold-boots IMAGE with its guest RAM in a shared file, waits until
the agent has imported the preload modules (the spec's preload list, or
--preload) and is idle, then saves the device state. kiln invoke restores
clones from it. Creating is idempotent: an existing valid snapshot is kept.`,
		Example: `  kiln snapshot create numpy.kimg
  kiln snapshot create numpy.kimg --preload numpy,scipy.linalg --memory 1G`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			lo, err := vf.options(a)
			if err != nil {
				return err
			}
			st, err := o.store(a)
			if err != nil {
				return err
			}
			img, err := image.OpenVerified(args[0])
			if err != nil {
				return err
			}
			so := sandbox.Options{VM: lo, Store: st, Snapshots: sandbox.SnapshotAuto}
			if preload != "" {
				so.Preload = strings.Split(preload, ",")
			}
			sb, err := sandbox.Start(cmd.Context(), img, so)
			if err != nil {
				return err
			}
			id := sb.SnapshotID()
			restored := sb.Restores.Load() == 1
			created := sb.SnapshotsCreated.Load() == 1
			sb.Close()
			if !restored {
				return fmt.Errorf("the snapshot could not be created or restored (run with -v for the reason)")
			}
			if asJSON {
				return a.printJSON(map[string]any{"id": id, "created": created})
			}
			verb := "created"
			if !created {
				verb = "exists"
			}
			_, err = fmt.Fprintf(a.stdout, "snapshot %s %s (a test restore answered)\n", id, verb)
			return err
		},
	}
	vf.add(cmd)
	cmd.Flags().StringVar(&preload, "preload", "", "comma-separated modules to import before saving (default: the image's preload list)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
