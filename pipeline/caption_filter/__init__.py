"""Stage 1b, the caption sense filter: keep the text filter's matches whose caption uses the
class name in the class's sense (sentence encoder), scored per row."""
