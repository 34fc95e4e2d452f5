package launch

import (
	"encoding/json"
	"fmt"

	"github.com/kiln-dev/kiln/internal/guest/proto"
)

func decodeJSON(f proto.Frame, v any) error {
	if err := json.Unmarshal(f.Payload, v); err != nil {
		return fmt.Errorf("decoding %s frame from the guest: %w", f.Type, err)
	}
	return nil
}
