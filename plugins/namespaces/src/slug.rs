//! Image references as Btrfs names: the slug of an image names its base root filesystem,
//! `images/<slug>`, which `scripts/build-rootfs.sh` prepares with the same rule.

/// The slug of an image reference: `:latest` appended when it has no tag (a tag is a `:` after
/// the last `/`), then every byte outside `[A-Za-z0-9._-]` replaced by `_`.
///
/// Bytes, not characters, so that the script (`sed` under `LC_ALL=C`) agrees on any input.
pub fn image_slug(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    let tagged = if last.contains(':') {
        image.to_string()
    } else {
        format!("{image}:latest")
    };
    tagged
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                b as char
            } else {
                '_'
            }
        })
        .collect()
}

/// The subvolume of an image's base root filesystem.
pub fn image_subvolume(image: &str) -> String {
    format!("images/{}", image_slug(image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        let cases = [
            ("ubuntu:22.04", "ubuntu_22.04"),
            ("ubuntu", "ubuntu_latest"),
            (
                "opensandbox-test/noshell",
                "opensandbox-test_noshell_latest",
            ),
            (
                "opensandbox-test/noshell:latest",
                "opensandbox-test_noshell_latest",
            ),
            // A registry port is not a tag: the tag is after the last '/'.
            ("localhost:5000/app", "localhost_5000_app_latest"),
            ("localhost:5000/app:v1", "localhost_5000_app_v1"),
            ("python:3.12-slim", "python_3.12-slim"),
            ("repo/img@sha256:ab12", "repo_img_sha256_ab12"),
            ("é", "___latest"),
        ];
        for (image, slug) in cases {
            assert_eq!(image_slug(image), slug, "{image}");
        }
        assert_eq!(image_subvolume("ubuntu:22.04"), "images/ubuntu_22.04");
    }
}
