// Package cache locates kiln's on-disk cache directory shared by all kiln processes.
package cache

import (
	"fmt"
	"os"
	"path/filepath"
)

// EnvVar names the environment variable that overrides the cache location.
const EnvVar = "KILN_CACHE"

// Dir returns the kiln cache directory, creating it if needed: $KILN_CACHE if
// set, else os.UserCacheDir()/kiln.
func Dir() (string, error) {
	dir := os.Getenv(EnvVar)
	if dir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			return "", fmt.Errorf("locating cache directory (set %s to choose one): %w", EnvVar, err)
		}
		dir = filepath.Join(base, "kiln")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("resolving cache directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("creating cache directory (set %s to choose another): %w", EnvVar, err)
	}
	return dir, nil
}

// Sub returns the subdirectory name of the cache directory, creating it if needed.
func Sub(name string) (string, error) {
	if name == "" || filepath.IsAbs(name) || !filepath.IsLocal(name) {
		return "", fmt.Errorf("invalid cache subdirectory %q", name)
	}
	dir, err := Dir()
	if err != nil {
		return "", err
	}
	sub := filepath.Join(dir, name)
	if err := os.MkdirAll(sub, 0o755); err != nil {
		return "", fmt.Errorf("creating cache directory: %w", err)
	}
	return sub, nil
}
